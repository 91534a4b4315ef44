"""uvicorn's HTTP/1.1 protocol, with its own answers in OpenAI's error shape and bounds on
the request head.

What goes wrong before a request reaches the app is answered here, as JSON like
every other error of hotmodel (uvicorn would write plain text, or nothing):

- bytes that are not HTTP/1.1 (a broken request line, header or chunk size):
  400, as uvicorn's parser refuses them;
- a request line and headers over ``MAX_HEAD_BYTES``: 431 (httptools has no
  limit of its own: a client could send megabytes of headers);
- a request head that has not arrived ``HEAD_TIMEOUT_S`` after the connection
  opened (or after its first byte, on a kept-alive connection): 408, or just the
  close when not a byte of it came. A stalled body gets its 408 from the app
  (``api/validate.py``); an idle kept-alive connection is closed by uvicorn.

Each of them closes the connection: the rest of the stream cannot be framed.

And one thing after: uvicorn frames every response without a length (a stream)
in chunks, which HTTP/1.0 does not have (an HTTP/1.0 client would read the
chunk sizes as data). To an HTTP/1.0 request such a response is sent as it
comes, and its end is the connection's close (HTTP/1.0 connections are not
kept alive).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from hotmodel.api.errors import error_body
from hotmodel.api.validate import BODY_TIMEOUT_S

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = BODY_TIMEOUT_S


class HeadTooLargeError(Exception):
    """Raised from a parser callback: httptools stops and reports a parser error."""


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; only what happens before the app is called differs."""

    head_timeout = HEAD_TIMEOUT_S
    max_head_bytes = MAX_HEAD_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_started = False
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    # --- the request head: its size and its deadline ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_started = True
        if self._head_timer is None:  # the next request on a kept-alive connection
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._head_started = False
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope.get("http_version") == "1.0":
            # the app is called on the loop's next turn: it gets this send
            cycle.send = _close_delimited(cycle)  # type: ignore[method-assign,assignment]

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_head_bytes:
            self._head_too_large = True
            raise HeadTooLargeError

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head behind a running request: not yet
            return
        if not self._head_started:
            self.transport.close()  # not a byte of a request: nothing to answer
            return
        self._refuse(
            b"408 Request Timeout",
            f"the request line and headers did not arrive within {self.head_timeout:g}s",
            "request_timeout",
        )

    # --- uvicorn's own answer to what its parser refuses ---

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse(
                b"431 Request Header Fields Too Large",
                f"the request line and headers are over {self.max_head_bytes} bytes",
                "request_header_too_large",
            )
            return
        self._refuse(
            b"400 Bad Request",
            "Invalid HTTP request: its bytes could not be parsed as HTTP/1.1 "
            "(request line, header or chunked body)",
            "http_400",
        )

    def _refuse(self, status: bytes, message: str, code: str) -> None:
        """Answer in OpenAI's error shape, then close the connection."""
        self._cancel_head_timer()
        body = json.dumps(error_body(message, "invalid_request_error", code)).encode()
        head = [b"HTTP/1.1 " + status + b"\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()


def _close_delimited(cycle: RequestResponseCycle) -> Callable[[Any], Awaitable[None]]:
    """``cycle.send`` for an HTTP/1.0 request: a response without a length is not chunked;
    the connection's close ends it (uvicorn closes it: no keep-alive for HTTP/1.0)."""
    send = cycle.send
    unframed = False

    async def send_10(message: Any) -> None:
        nonlocal unframed
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", [])}
            unframed = (
                not names & {b"content-length", b"transfer-encoding"}
                and cycle.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
            )
            if unframed:
                cycle.chunked_encoding = False  # uvicorn would choose chunks
        elif unframed and message["type"] == "http.response.body":
            # uvicorn counts a length down to 0; this body's length is the rest
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    return send_10
