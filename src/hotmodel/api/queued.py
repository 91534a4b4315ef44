"""A streamed request that waits in a queue: its answer starts early, to show its place.

A ``stream: true`` request waiting for another model to be loaded gets its SSE
answer's head (200, ``text/event-stream``) at once, then an SSE comment each time
its place in line changes (and every few seconds): ``: queued 2 of 5 for gemma3,
waited 1.2 s``. SSE parsers (the OpenAI SDKs') ignore comments. Once the head is
sent, what would have been sent as a whole answer comes through :meth:`send`
instead: the upstream stream's own head is dropped (its body follows the head
sent), and an error answer (the switch failed, the queue wait timed out, the
router answered 4xx/5xx) becomes the stream's last event, ``data: {"error": ...}``,
which the OpenAI SDKs raise as an ``APIError``.

A request that a peer forwarded (a cluster) waits without a head: the peer
that forwarded it may still place it elsewhere if this node dies before
answering, which an answer already begun would forbid.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import Message, Scope, Send

from hotmodel import sse
from hotmodel.api.placement import forwarded
from hotmodel.api.relay import SSE_HEADERS
from hotmodel.control.scheduler import Position


class EarlyStream:
    """Wraps the request's ``send``; starts the SSE answer at the first :meth:`tell`."""

    def __init__(self, send: Send, headers: Mapping[str, str], scope: Scope) -> None:
        self._send = send
        self._quiet = forwarded(scope)
        self._headers = {"content-type": "text/event-stream", **SSE_HEADERS, **headers}
        self.started = False
        self._error: list[bytes] | None = None  # an error answer's body, being collected

    async def tell(self, where: Position) -> None:
        """Send the waiter's place as an SSE comment (the answer's head first, once)."""
        if self._quiet:
            return
        if not self.started:
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._headers.items()]
            await self._send({"type": "http.response.start", "status": 200, "headers": raw})
            self.started = True
        body = f": {where}\n\n".encode()
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def send(self, message: Message) -> None:
        """What the request sends, fitted to an answer whose head may have gone."""
        if not self.started:
            await self._send(message)
            return
        if message["type"] == "http.response.start":
            if message["status"] >= 400:
                self._error = []  # its body becomes the stream's last event
            return
        if message["type"] == "http.response.body" and self._error is not None:
            self._error.append(message.get("body", b""))
            if not message.get("more_body", False):
                event = sse.encode(b"".join(self._error))
                await self._send({"type": "http.response.body", "body": event, "more_body": False})
            return
        await self._send(message)
