"""Forwarding, shared by every inference endpoint: the upstream call, its answer, and the
one resend after a refused connection.

- :func:`open_upstream`: a place upstream (``control/upstream.py``), then the POST to the
  model's own server (or the router), both entered on the request's stack; a refused
  connection (nothing was sent) becomes :class:`RefusedError`.
- :func:`answer`: one request's answer, sent once more after a refused connection, an
  error after an early stream head as the stream's last event; through
- :func:`retry_refused`: runs one attempt; when llama-server refused the connection and
  a recovery begins, the request waits for it and is sent once more.
- :func:`bound_length`: the default answer length, for a request that sets none.
- :func:`ended_by`: the error of a request that a switch or the shutdown cancelled.
- :class:`Answer`: a whole JSON answer as two ASGI messages.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.types import Message as AsgiMessage
from starlette.types import Receive, Scope, Send

from hotmodel.api.errors import hotmodel_error_response
from hotmodel.api.queued import EarlyStream
from hotmodel.api.record import RequestRecord
from hotmodel.config import Config
from hotmodel.control.traffic import SHUTTING_DOWN, Ticket
from hotmodel.errors import (
    HotModelError,
    ModelUnavailableError,
    RouterRefusedError,
    ShuttingDownError,
    SwitchCancelledError,
)
from hotmodel.router.chat_http import CHAT, CHAT_PATH, Upstream
from hotmodel.runtime import Services

log = logging.getLogger("hotmodel.chat")

# How long a request whose connection llama-server refused waits to see a recovery begin
# (the watchdog confirms a dead model process within 2 s; a dead router at once).
RECOVERY_NOTICE_S = 3.0


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole JSON answer, sent as two ASGI messages (what Starlette's ``Response`` would
    send, without building one per request)."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body))]
        raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})


class RefusedError(Exception):
    """llama-server refused the request's connection: nothing was sent upstream."""

    def __init__(self, error: ModelUnavailableError | RouterRefusedError) -> None:
        super().__init__(str(error))
        self.error = error


async def open_upstream(
    stack: contextlib.AsyncExitStack,
    s: Services,
    model: str,
    body: bytes,
    accept: str,
    path: str = CHAT_PATH,
    what: str = CHAT,
) -> Upstream:
    """Wait for a place upstream for ``model`` (no more at once than it serves), then send
    ``body`` to llama-server's ``path``; both are released by ``stack``."""
    await stack.enter_async_context(s.upstream.hold(model))
    try:
        return await stack.enter_async_context(s.router.chat(body, accept, model, path, what))
    except (ModelUnavailableError, RouterRefusedError) as exc:
        raise RefusedError(exc) from exc  # nothing sent: it may be resent


# What a client may bound its answer with; with none, [server] default_max_tokens applies.
_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict")


def bound_length(config: Config, payload: dict[str, Any], model: str) -> None:
    """No request holds the model forever: one that sets no length gets the preset's
    ``n-predict`` (llama-server applies it), else ``[server] default_max_tokens``
    (llama-server reads ``max_tokens`` on its native endpoints too)."""
    bound = config.server.default_max_tokens
    if not bound or any(payload.get(k) is not None for k in _LENGTH_FIELDS):
        return
    if not config.presets.bounds_generation(model):
        payload["max_tokens"] = bound


def ended_by(ticket: Ticket) -> HotModelError:
    """What a request whose I/O its ticket cancelled answers: the shutdown or a switch."""
    if ticket.cancel_code == SHUTTING_DOWN:
        return ShuttingDownError(ticket.cancel_reason or "hotmodel is shutting down")
    return SwitchCancelledError(ticket.cancel_reason or "cancelled by a switch")


Attempt = Callable[[Send], Awaitable["Response | Answer | None"]]


async def retry_refused(
    s: Services, attempt: Attempt, send: Send, undo: Callable[[], None] | None = None
) -> Response | Answer | None:
    """``attempt(send)``; when llama-server refused the connection (the model's process or
    the router died: nothing was sent) and a recovery begins, the request waits for it
    (re-admitted through the gate, which the recovery holds) and is sent again once,
    after ``undo`` put back what the first attempt changed. Without a recovery (none
    configured), or once the answer has started, the 503 with ``Retry-After`` stands."""
    started = False

    async def tracking(message: AsgiMessage) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        return await attempt(tracking)
    except RefusedError as refused:
        if started or not await s.gate.recovery_begins(RECOVERY_NOTICE_S):
            raise refused.error from refused.error.__cause__  # the address: for the log
    log.info("llama-server refused the connection; the request waits for the recovery")
    if undo is not None:
        undo()
    try:
        return await attempt(send)
    except RefusedError as again:
        raise again.error from again.error.__cause__


async def answer(
    s: Services,
    attempt: Attempt,
    payload: dict[str, Any],
    early: EarlyStream | None,
    record: RequestRecord,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Answer one request: ``attempt`` (through :func:`retry_refused`, sent again with
    ``payload`` as it came: a session's prompt replaces its messages), then the answer it
    returned, sent after its ticket, slot and lock are returned. An error after
    ``early``'s head went out is the stream's last event instead of a status."""
    original = dict(payload)

    def undo() -> None:
        payload.clear()
        payload.update(original)

    try:
        response = await retry_refused(s, attempt, send, undo)
    except HotModelError as exc:
        if early is None or not early.started:
            raise  # answered with its status, as any error
        response = hotmodel_error_response(exc, record.request_id)  # the last event
    if response is not None:
        await response(scope, receive, send)
