"""The stream relay: an upstream SSE answer goes to the client chunk by chunk, never buffered.

A task watches for the client's ``http.disconnect``; when it comes, the relay
is cancelled and the caller's ``async with`` closes the upstream answer, so
llama-server stops generating. The request's ticket cancels the relay when a
switch must end it: the client then gets a last SSE error event, as it does
when the router's stream breaks. A complete answer is handed to ``on_reply``
(shielded from cancellation) before the chunk that ends it is sent, so a
client that reads its session right after the stream finds the answer there;
when that fails (the store cannot be written), the error event goes just
before the upstream's ``data: [DONE]`` (:class:`ErrorBeforeDone`): a client
stops reading at ``[DONE]``, and would never see an error sent after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import anyio
from starlette.types import Receive, Send

from hotmodel.api.errors import public_message, sse_error
from hotmodel.api.record import RequestRecord, has_text
from hotmodel.control.traffic import Ticket
from hotmodel.errors import HotModelError, RouterError
from hotmodel.router.chat_http import Upstream
from hotmodel.sessions.reply import Message, ReplyAssembler

log = logging.getLogger("hotmodel.api")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DONE = b"data: [DONE]"
OnReply = Callable[[Message], Awaitable[None]]


async def relay(
    upstream: Upstream,
    ticket: Ticket,
    receive: Receive,
    send: Send,
    headers: Mapping[str, str],
    on_reply: OnReply | None = None,
    record: RequestRecord | None = None,
    on_end: Callable[[], None] | None = None,
) -> None:
    """Relay ``upstream`` to the client until it ends, breaks, is cancelled or the client leaves.

    ``record`` gets the time of the first generated text and, from the last
    chunks, the token counts. ``on_end`` runs when the upstream answer is over,
    before the client's stream ends: what it records is there once the client has
    the whole answer.
    """
    raw_headers = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in {"content-type": "text/event-stream", **SSE_HEADERS, **headers}.items()
    ]
    async with anyio.create_task_group() as tg:

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch_disconnect)
        # Caught here, inside the group: anyio would wrap an escaping error in a group.
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status_code,
                    "headers": raw_headers,
                }
            )
            tail = await _pump(upstream, ticket, send, on_reply, record or RequestRecord.detached())
            if on_end is not None:
                try:
                    on_end()
                except Exception:  # what it records must not cut the client's answer
                    log.exception("recording the end of a streamed answer failed")
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:
            pass  # the client went away while we were sending
        finally:
            tg.cancel_scope.cancel()


async def read_unless_gone(upstream: Upstream, receive: Receive) -> bytes | None:
    """The whole (non-streamed) answer, or None when the client went away first.

    A client that leaves stops the read, so the upstream answer is closed and
    llama-server stops generating; nothing is stored for an answer nobody got.
    llama-server sends a plain answer's headers only once it is generated, so its body
    has usually arrived with them: then it is simply taken, with no watch to set up.
    (So a client that leaves in the last moments, or within the first
    :data:`WATCH_AFTER_S` of a short answer, may have that answer stored in its session:
    the turn happened; only the sending failed.)
    """
    if upstream.arrived():
        return await upstream.read()
    reader = asyncio.ensure_future(upstream.read())
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # no await here: this may run inside a cancelled scope (a switch's cancel)
        watcher.cancel()
        reader.cancel()
    if reader.done() and not reader.cancelled():
        return reader.result()  # raises the read's own error, if it failed
    return None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# Most answers start within this: for them no watch task is made at all (a task per
# request, made and cancelled, was a visible part of hotmodel's per-request cost). A
# client that leaves sooner is noticed this much later: llama-server has then done
# at most this much work for nobody.
WATCH_AFTER_S = 0.05


class DisconnectWatch:
    """While armed (``with``), a client that disconnects cancels ``scope``.

    For the wait until llama-server's answer starts: a plain (non-streamed)
    answer starts only when the whole generation is done, and a client that
    leaves meanwhile must stop it then, not minutes later. The watching task is
    made only once the wait has lasted :data:`WATCH_AFTER_S`.
    """

    def __init__(self, receive: Receive, scope: anyio.CancelScope) -> None:
        self._receive = receive
        self._scope = scope
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Future[None] | None = None
        self.gone = False

    def __enter__(self) -> DisconnectWatch:
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._arm)
        return self

    def _arm(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(_disconnected(self._receive))
        self._task.add_done_callback(self._fire)

    def _fire(self, task: asyncio.Future[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self.gone = True
        self._scope.cancel()

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()  # no await: this may run inside a cancelled scope


class ErrorBeforeDone:
    """Puts an error event into a relayed stream just before its ``data: [DONE]`` line.

    Chunks go through :meth:`feed`; while the event is pending, bytes that may be
    the beginning of a ``[DONE]`` line cut across reads are held back until the
    next chunk says. :meth:`end` gives what is left when the stream ends (the
    event itself, if no ``[DONE]`` came).
    """

    def __init__(self, event: bytes) -> None:
        self.event = event
        self._held = b""
        self._line_start = False  # whether the bytes before ``_held`` ended a line
        self._placed = False

    def feed(self, chunk: bytes) -> bytes:
        if self._placed:
            return chunk
        data, self._held = self._held + chunk, b""
        at = self._done_at(data)
        if at >= 0:
            self._placed = True
            return data[:at] + self.event + data[at:]
        keep = next((k for k in range(len(DONE) - 1, 0, -1) if data.endswith(DONE[:k])), 0)
        out, self._held = data[: len(data) - keep], data[len(data) - keep :]
        if out:
            self._line_start = out.endswith((b"\n", b"\r"))
        return out

    def _done_at(self, data: bytes) -> int:
        """Where a ``data: [DONE]`` line starts in ``data`` (-1: none; the same text
        inside a JSON string, as generated text, is not one)."""
        at = data.find(DONE)
        while at >= 0 and not (
            data[at - 1 : at] in (b"\n", b"\r") or (at == 0 and self._line_start)
        ):
            at = data.find(DONE, at + 1)
        return at

    def end(self) -> bytes:
        held, self._held = self._held, b""
        if self._placed:
            return held
        self._placed = True
        return held + self.event


async def _pump(
    upstream: Upstream,
    ticket: Ticket,
    send: Send,
    on_reply: OnReply | None,
    record: RequestRecord,
) -> bytes:
    """Send every upstream chunk; returns the bytes that end the client's stream.

    Per chunk, the metrics cost a substring search until the first text, and
    three name rebinds: llama-server's counts are in its last event, so only
    the last three chunks are kept (an event may be cut across reads) and
    searched once, at the end.
    """
    tail = b""
    assembler = ReplyAssembler() if on_reply is not None else None
    failed: ErrorBeforeDone | None = None  # the answer was not stored: the client is told
    waiting = True  # for the first generated text
    last3 = last2 = last = b""
    with anyio.CancelScope() as scope:
        ticket.bind(scope)
        try:
            async for chunk in upstream.chunks():
                if assembler is not None and on_reply is not None:
                    assembler.feed(chunk)
                    reply = assembler.message()
                    if reply is not None:
                        assembler = None
                        failed = await _store(on_reply, reply, record.request_id)
                out = chunk if failed is None else failed.feed(chunk)
                await send({"type": "http.response.body", "body": out, "more_body": True})
                if waiting and has_text(chunk):
                    record.first_token, waiting = time.perf_counter(), False
                last3, last2, last = last2, last, chunk
            record.upstream_done(b"".join((last3, last2, last)))
        except RouterError as exc:
            message = public_message(exc, record.request_id, "the router's stream broke")
            tail = sse_error(message, "upstream_stream_error")
    if scope.cancelled_caught:
        tail = sse_error(ticket.cancel_reason or "cancelled", ticket.cancel_code)
    return tail if failed is None else failed.end() + tail


async def _store(on_reply: OnReply, reply: Message, request_id: str) -> ErrorBeforeDone | None:
    """Store a complete streamed answer (shielded); when that fails, the error event
    that the client's stream is to carry before its ``[DONE]``."""
    try:
        with anyio.CancelScope(shield=True):
            await on_reply(reply)
    except HotModelError as exc:  # the answer goes on; the client is told
        message = public_message(exc, request_id, "the answer was not stored in the session")
        return ErrorBeforeDone(sse_error(message, "store_error"))
    return None
