"""``POST /v1/chat/completions``: parse once, admit, name the model, forward, relay.

The endpoint is a plain ASGI app so that one coroutine owns everything a
request acquires, from admission to the last relayed byte: the session's lock,
the traffic ticket and the upstream answer are entered on one
``AsyncExitStack`` and released on every exit path (an error, a client that
goes away, a switch that cancels the request, a server shutdown). The stream
relay borrows them; there is no hand-off in which they could be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Message as AsgiMessage
from starlette.types import Receive, Scope, Send

from hotmodel.api.auth import came_with_admin_key, owner_of
from hotmodel.api.errors import hotmodel_error_response, upstream_error_response
from hotmodel.api.queued import EarlyStream
from hotmodel.api.record import RequestRecord, record_of
from hotmodel.api.relay import DisconnectWatch, OnReply, read_unless_gone, relay
from hotmodel.api.validate import (
    check_fields,
    check_messages,
    check_prompt_length,
    check_tree,
    parse_json,
    read_asgi_body,
    tree_needs_check,
)
from hotmodel.control.fit import largest_context
from hotmodel.control.snapshots import Turn
from hotmodel.control.traffic import SHUTTING_DOWN, Ticket
from hotmodel.errors import (
    AutoSwitchForbiddenError,
    HotModelError,
    InvalidRequestError,
    ModelNotActiveError,
    ModelNotFoundError,
    ModelUnavailableError,
    RouterProtocolError,
    RouterRefusedError,
    RouterUnavailableError,
    ShuttingDownError,
    SwitchCancelledError,
)
from hotmodel.runtime import Services
from hotmodel.sessions.reply import Message
from hotmodel.sessions.service import Prepared, SessionRef

ACTIVE_ALIAS = "active"
# Renamed request fields: a clear 400 instead of a silent pass-through to llama-server.
_RENAMED = {"preset": "system_prompt", "x-preset": "X-System-Prompt"}


@dataclass
class ChatRequest:
    """A chat request as parsed at the door."""

    payload: dict[str, Any]
    session: SessionRef | None
    stream: bool
    accept: str
    owner: str = ""  # the API key's fingerprint ('' when keys are off)
    admin: bool = False  # it came with an admin key
    early: EarlyStream | None = None  # a stream: told its place while it waits in a queue


def parse_body(body: bytes) -> dict[str, Any]:
    """A JSON object body, checked for depth and unencodable strings (400 otherwise)."""
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    if tree_needs_check(body):
        check_tree(payload)
    return payload


# The request headers the chat path reads, picked in one pass over the raw list.
_HEADERS = frozenset(
    {b"x-session-id", b"x-system-prompt", b"accept", b"content-length", b"preset", b"x-preset"}
)


log = logging.getLogger("hotmodel.chat")

# How long a request whose connection llama-server refused waits to see a recovery begin
# (the watchdog confirms a dead model process within 2 s; a dead router at once).
RECOVERY_NOTICE_S = 3.0
# What a client may bound its answer with; with none, [server] default_max_tokens applies.
_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")
# Two of these in one request could name two different sessions or prompts: refused.
_ONE_ONLY = frozenset({"x-session-id", "x-system-prompt"})


def chat_headers(scope: Scope) -> dict[str, str]:
    """The headers :func:`parse_chat` needs (the first of each name, as Starlette's)."""
    found: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name in _HEADERS:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            if key in _ONE_ONLY and found.get(key, text) != text:
                raise InvalidRequestError(f"two different {key} headers", param=key)
            found.setdefault(key, text)
    return found


def _one_of(header: str | None, field: object, header_name: str, field_name: str) -> object:
    """A value given as a header or a body field: the one given, refused when both differ."""
    if header is None:
        return field
    if field is not None and field != header:
        raise InvalidRequestError(
            f"{header_name} and {field_name!r} differ; send one of them", param=field_name
        )
    return header


def parse_chat(
    body: bytes, headers: Mapping[str, str], scope: Scope, services: Services
) -> ChatRequest:
    payload = parse_body(body)
    if "messages" not in payload:
        raise InvalidRequestError("'messages' is required", param="messages")
    config = services.config
    check_messages(payload["messages"], config.server.max_messages)
    check_prompt_length(payload["messages"], largest_context(config.presets, config.router))
    check_fields(payload)
    for old, new in _RENAMED.items():
        if old in payload or old in headers:
            raise InvalidRequestError(f"{old!r} was renamed {new!r}", param=old)
    body_session = payload.pop("session_id", None)
    body_prompt = payload.pop("system_prompt", None)
    session_id = _one_of(headers.get("x-session-id"), body_session, "X-Session-Id", "session_id")
    prompt = _one_of(
        headers.get("x-system-prompt"), body_prompt, "X-System-Prompt", "system_prompt"
    )
    session = None
    if session_id is not None:
        session = services.sessions.check(session_id, prompt, owner_of(scope))
    elif prompt is not None:
        raise InvalidRequestError(
            "'system_prompt' applies to a session: send X-Session-Id or session_id too",
            param="system_prompt",
        )
    stream, accept = bool(payload.get("stream")), headers.get("accept", "*/*")
    return ChatRequest(
        payload, session, stream, accept, owner_of(scope), came_with_admin_key(scope)
    )


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


class _RefusedError(Exception):
    """llama-server refused the request's connection: nothing was sent upstream."""

    def __init__(self, error: ModelUnavailableError | RouterRefusedError) -> None:
        super().__init__(str(error))
        self.error = error


class _SlotsTakenError(Exception):
    """The loaded model's slots are taken while another model's requests wait."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class ModelParkedError(Exception):
    """No model is loaded because ``model`` was unloaded for idleness: load it back."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


def resolve_model(
    requested: object, active: str | None, presets: Collection[str], parked: str | None = None
) -> str:
    """The preset a chat request goes to: ``"active"``/omitted/the active id, else an error
    (:class:`ModelParkedError` when the model it means was unloaded for idleness)."""
    if active is None and parked is not None:
        if requested is None or requested in ("", ACTIVE_ALIAS, parked):
            raise ModelParkedError(parked)
        active = parked  # another preset: as if the parked one were active
    if active is None:
        raise RouterUnavailableError(
            "no model is loaded (the last switch and its rollback failed, or it was "
            "unloaded); switch to a model with POST /admin/switch"
        )
    if requested is None or requested in ("", ACTIVE_ALIAS, active):
        return active
    if not isinstance(requested, str):
        raise ModelNotFoundError("'model' must be a string", param="model")
    if requested not in presets:
        raise ModelNotFoundError.not_a_preset(requested, [ACTIVE_ALIAS, *presets])
    raise ModelNotActiveError(
        f"model {requested!r} is a preset but not the active model ({active!r}); "
        "switch to it first (hotmodel switch / POST /admin/switch), enable "
        "[switch] auto, or send model 'active'",
        param="model",
    )


def reply_of(data: bytes) -> Message:
    """The assistant message of a (non-streamed) chat completion."""
    try:
        message = json.loads(data)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RouterProtocolError("the router's answer has no message", detail=repr(exc)) from exc
    if not isinstance(message, dict):
        raise RouterProtocolError("the router's answer has no message object")
    return {k: v for k, v in message.items() if v is not None}


class ChatCompletions:
    """The ASGI app behind ``POST /v1/chat/completions``."""

    def __init__(self, services: Services) -> None:
        self.s = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = chat_headers(scope)
        limit = self.s.config.server.max_body_bytes
        body = await read_asgi_body(receive, headers.get("content-length", ""), limit)
        chat = parse_chat(body, headers, scope, self.s)
        record = record_of(scope) or RequestRecord.detached()
        record.stream = chat.stream
        if chat.session is not None:
            record.session = chat.session.id
        if chat.stream:
            session = {} if chat.session is None else {"x-session-id": chat.session.id}
            chat.early = EarlyStream(send, session)
            send = chat.early.send
        try:
            response = await self._answer_or_retry(chat, record, receive, send)
        except HotModelError as exc:
            if chat.early is None or not chat.early.started:
                raise  # answered with its status, as any error
            response = hotmodel_error_response(exc, record.request_id)  # the last event
        if response is not None:  # sent after the ticket and the session lock are returned
            await response(scope, receive, send)

    async def _answer_or_retry(
        self, chat: ChatRequest, record: RequestRecord, receive: Receive, send: Send
    ) -> Response | Answer | None:
        """:meth:`_answer`; when llama-server refused the connection (the model's process or
        the router died: nothing was sent) and a recovery begins, the request waits for
        it (re-admitted through the gate, which the recovery holds) and is sent again once.
        Without a recovery (none configured), the 503 with ``Retry-After`` stands."""
        started = False

        async def tracking(message: AsgiMessage) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        original = dict(chat.payload)  # a session's prompt replaces its messages: undo that
        try:
            return await self._answer(chat, record, receive, tracking)
        except _RefusedError as refused:
            if started or not await self.s.gate.recovery_begins(RECOVERY_NOTICE_S):
                raise refused.error from refused.error.__cause__  # the address: for the log
        log.info("llama-server refused the connection; the request waits for the recovery")
        chat.payload.clear()
        chat.payload.update(original)
        try:
            return await self._answer(chat, record, receive, send)
        except _RefusedError as again:
            raise again.error from again.error.__cause__

    async def _answer(
        self, chat: ChatRequest, record: RequestRecord, receive: Receive, send: Send
    ) -> Response | Answer | None:
        """Forward ``chat``; relays a stream itself (None), else returns the answer to send.

        ``record`` gets the model, the upstream call's times and the token counts.
        """
        async with contextlib.AsyncExitStack() as stack:
            if chat.session is not None:
                timeout = self.s.config.session.queue_timeout_seconds
                await stack.enter_async_context(
                    self.s.sessions.locks.hold(chat.session.lock_key, timeout)
                )
            ticket = await stack.enter_async_context(self.admitted(chat, receive))
            model = ticket.model
            assert model is not None  # admitted() names it
            chat.payload["model"] = model
            record.model = model
            self._bound_length(chat.payload, model)
            prepared = None
            headers: dict[str, str] = {}
            if chat.session is not None:
                prepared = await self.s.sessions.prepare(
                    chat.session, chat.payload["messages"], model
                )
                chat.payload["messages"] = prepared.prompt.messages()
                headers["x-session-id"] = prepared.session_id
            await stack.enter_async_context(self._own_slot(chat, model))
            body = json.dumps(chat.payload, ensure_ascii=False).encode()
            gen = self.s.sessions.slots.touch(model)  # a session's turn labels it once complete
            if prepared is not None:
                prepared.slot_gen = gen
            with anyio.CancelScope() as scope:
                ticket.bind(scope)  # a switch that cancels this request cancels its I/O
                record.upstream_start()
                with DisconnectWatch(receive, scope) as watch:  # until the answer starts
                    # no more upstream at once than the model serves (control/upstream.py)
                    await stack.enter_async_context(self.s.upstream.hold(model))
                    try:
                        upstream = await stack.enter_async_context(
                            self.s.router.chat(body, chat.accept, model)
                        )
                    except (ModelUnavailableError, RouterRefusedError) as exc:
                        raise _RefusedError(exc) from exc  # nothing sent: it may be resent
                if upstream.status_code >= 400:
                    error = await upstream.read()
                    record.upstream_done(error)
                    return upstream_error_response(upstream.status_code, error, record.request_id)
                if chat.stream:
                    on_reply = None if prepared is None else self._recorder(prepared, model)
                    ended = functools.partial(self._turn_ended, chat, model, gen, record)
                    await relay(upstream, ticket, receive, send, headers, on_reply, record, ended)
                    return None
                data = await read_unless_gone(upstream, receive)
                if data is None:
                    return None  # the client left: nothing to send, nothing stored
                record.upstream_done(data)
                if prepared is not None:
                    with anyio.CancelScope(shield=True):
                        await self.s.sessions.complete(prepared, reply_of(data), model)
                self._turn_ended(chat, model, gen, record)
                return Answer(upstream.status_code, data, headers)
            if watch.gone:
                return None  # the client left while llama-server worked: it is stopped
            if ticket.cancel_code == SHUTTING_DOWN:
                raise ShuttingDownError(ticket.cancel_reason or "hotmodel is shutting down")
            raise SwitchCancelledError(ticket.cancel_reason or "cancelled by a switch")

    def _bound_length(self, payload: dict[str, Any], model: str) -> None:
        """No request holds the model forever: one that sets no length gets the preset's
        ``n-predict`` (llama-server applies it), else ``[server] default_max_tokens``."""
        bound = self.s.config.server.default_max_tokens
        if not bound or any(payload.get(k) is not None for k in _LENGTH_FIELDS):
            return
        if not self.s.config.presets.bounds_generation(model):
            payload["max_tokens"] = bound

    @contextlib.asynccontextmanager
    async def _own_slot(self, chat: ChatRequest, model: str) -> AsyncIterator[None]:
        """Hold the key's slot on ``model`` for this request; the prompt cache is reused
        only when the slot holds this key's own prompt (sessions/tenants.py)."""
        tenants = self.s.sessions.tenants
        timeout = self.s.config.session.queue_timeout_seconds
        keys = self.s.config.keys.enabled
        async with tenants.use(model, chat.owner, timeout) as reuse:
            if not reuse or (keys and self.s.supervisor.ram_cache_shared):
                # another key's prompt is in the slot, or (keys set by a reload, until a
                # restart) llama-server's RAM cache could bring one back
                chat.payload["cache_prompt"] = False
            if keys:
                pinned = tenants.pinned(chat.owner)
                if pinned is None:
                    chat.payload.pop("id_slot", None)  # one slot: nothing to choose
                else:
                    chat.payload["id_slot"] = pinned  # never another key's slot
            yield

    def _turn_ended(self, chat: ChatRequest, model: str, gen: int, record: RequestRecord) -> None:
        """The first answer after a KV restore may prove it (its ``cache_n``)."""
        if self.s.snapshots is None or record.usage is None:
            return
        session = chat.session
        self.s.snapshots.turn_ended(
            Turn(
                model,
                gen,
                None if session is None else (session.owner, session.id),
                None if session is None else chat.payload["messages"],
                record.usage.cached,
                chat.payload.get("cache_prompt") is not False,
            )
        )

    def _recorder(self, prepared: Prepared, model: str) -> OnReply:
        async def on_reply(reply: Message) -> None:
            await self.s.sessions.complete(prepared, reply, model)

        return on_reply

    @contextlib.asynccontextmanager
    async def admitted(self, chat: ChatRequest, receive: Receive) -> AsyncIterator[Ticket]:
        """A ticket whose ``model`` is named; auto-switches first when that is enabled (for
        the chat's session: its conversation is the one restored or replayed into the
        model), and allowed to this caller (``[switch] auto_access``: its key's access);
        a queued request has its key's priority (``[security] key_priorities``)."""
        s, cfg = self.s, self.s.config.switch
        requested, admin = chat.payload.get("model"), chat.admin
        residents = s.controller.residents
        if isinstance(requested, str) and requested in residents.names:
            # a resident is served beside the scheduler: no queue, no switch, and a switch
            # of the active model (its closed gate) does not hold it
            async with s.gate.admit(cfg.queue_timeout_seconds, beside=True) as ticket:
                s.supervisor.ensure_running()
                residents.check_ready(requested)  # a 503 while it is not loaded
                ticket.model = requested
                yield ticket
            return
        deadline = asyncio.get_running_loop().time() + cfg.queue_timeout_seconds
        released = False  # the scheduler let it go: it is admitted, as its batch
        since: float | None = None  # when it first joined a queue: it keeps its place
        # a request that names no model takes whichever is loaded: it never waits for a slot
        # of one model (a switch away would tie it to that model)
        named = requested not in (None, "", ACTIVE_ALIAS)
        while True:
            left = max(0.001, deadline - asyncio.get_running_loop().time())
            async with s.gate.admit(left) as ticket:
                try:
                    ticket.model = self._resolve(requested)
                    if named and not (released or s.scheduler.admits(ticket.model)):
                        # others wait for another model: it waits for a free slot, in
                        # line, so a switch for them drains no more than the slots
                        raise _SlotsTakenError(ticket.model)
                except ModelNotActiveError:
                    if not cfg.auto:
                        raise
                    assert isinstance(requested, str)  # "not active" is said only of a preset
                    self._may_switch(admin, requested)
                    target = requested
                except ModelParkedError as parked:
                    target = parked.model  # unloaded for idleness: the request loads it back
                except _SlotsTakenError as full:
                    target = full.model
                else:
                    yield ticket
                    return
            # The ticket is returned before the wait: a switch drains in-flight tickets. The
            # request waits in its model's queue; the scheduler switches for the whole queue
            # (and if another switch came first, the request waits again, within its bound).
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            since = s.scheduler.now() if since is None else since
            priority = s.config.keys.priority(chat.owner)
            tell = None if chat.early is None else chat.early.tell
            with anyio.CancelScope() as cancel, DisconnectWatch(receive, cancel) as watch:
                await s.scheduler.wait_for(target, chat.session, left, priority, since, tell)
            if watch.gone:
                raise ClientDisconnect()  # it left while it waited: nobody to answer (a 499)
            released = True

    def _may_switch(self, admin: bool, target: str) -> None:
        if self.s.config.keys.enabled and self.s.config.switch.auto_access == "admin" and not admin:
            raise AutoSwitchForbiddenError(
                f"model {target!r} is not the active model, and only an admin key may switch "
                "([switch] auto_access = \"admin\"); send model 'active' or ask an admin",
                param="model",
            )

    def _resolve(self, requested: object) -> str:
        self.s.supervisor.ensure_running()  # a dead router: say so, with its exit code
        controller = self.s.controller
        return resolve_model(
            requested, controller.active, self.s.config.presets.models, controller.parked
        )
