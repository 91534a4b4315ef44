"""``POST /v1/chat/completions``: parse once, admit, name the model, forward, relay.

The endpoint is a plain ASGI app so that one coroutine owns everything a
request acquires, from admission to the last relayed byte: the session's lock,
the traffic ticket and the upstream answer are entered on one
``AsyncExitStack`` and released on every exit path (an error, a client that
goes away, a switch that cancels the request, a server shutdown). The stream
relay borrows them; there is no hand-off in which they could be lost.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from hotmodel.api.admission import (
    ACTIVE_ALIAS,
    Admission,
    ModelParkedError,
    resolve_model,
)
from hotmodel.api.auth import came_with_admin_key, owner_of
from hotmodel.api.errors import upstream_error_response
from hotmodel.api.forward import Answer, answer, bound_length, ended_by, open_upstream
from hotmodel.api.queued import EarlyStream
from hotmodel.api.record import RequestRecord, record_of
from hotmodel.api.relay import DisconnectWatch, OnReply, read_unless_gone, relay
from hotmodel.api.validate import (
    check_fields,
    check_messages,
    check_prompt_length,
    parse_body,
    read_asgi_body,
)
from hotmodel.control.fit import largest_context
from hotmodel.control.snapshots import Turn
from hotmodel.errors import (
    InvalidRequestError,
    RouterProtocolError,
)
from hotmodel.runtime import Services
from hotmodel.sessions.reply import Message
from hotmodel.sessions.service import Prepared, SessionRef

# re-exported: the names other modules (and tests) know from here
__all__ = [
    "ACTIVE_ALIAS",
    "ChatCompletions",
    "ModelParkedError",
    "parse_body",
    "parse_chat",
    "resolve_model",
]
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


# The request headers the chat path reads, picked in one pass over the raw list.
_HEADERS = frozenset(
    {b"x-session-id", b"x-system-prompt", b"accept", b"content-length", b"preset", b"x-preset"}
)


log = logging.getLogger("hotmodel.chat")

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
        self.admission = Admission(services)

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
            chat.early = EarlyStream(send, session, scope)
            send = chat.early.send

        async def attempt(to: Send) -> Response | Answer | None:
            return await self._answer(chat, record, receive, to)

        await answer(self.s, attempt, chat.payload, chat.early, record, scope, receive, send)

    async def _answer(
        self, chat: ChatRequest, record: RequestRecord, receive: Receive, send: Send
    ) -> Response | Answer | None:
        """Forward ``chat``; relays a stream itself (None), else returns the answer to send.

        ``record`` gets the model, the upstream call's times and the token counts.
        """
        async with contextlib.AsyncExitStack() as stack:
            if chat.session is not None:
                timeout = self.s.config.session.queue_timeout_seconds
                await stack.enter_async_context(self.s.sessions.hold(chat.session, timeout))
            ticket = await stack.enter_async_context(
                self.admission.admitted(
                    chat.payload.get("model"),
                    receive,
                    owner=chat.owner,
                    admin=chat.admin,
                    session=chat.session,
                    tell=None if chat.early is None else chat.early.tell,
                )
            )
            model = ticket.model
            assert model is not None  # admitted() names it
            chat.payload["model"] = model
            record.model = model
            bound_length(self.s.config, chat.payload, model)
            prepared = None
            headers: dict[str, str] = {}
            if chat.session is not None:
                prepared = await self.s.sessions.prepare(
                    chat.session, chat.payload["messages"], model
                )
                chat.payload["messages"] = prepared.prompt.messages()
                headers["x-session-id"] = prepared.session_id
            await stack.enter_async_context(
                self.admission.own_slot(chat.payload, model, chat.owner)
            )
            body = json.dumps(chat.payload, ensure_ascii=False).encode()
            gen = self.s.sessions.slots.touch(model)  # a session's turn labels it once complete
            if prepared is not None:
                prepared.slot_gen = gen
            with anyio.CancelScope() as scope:
                ticket.bind(scope)  # a switch that cancels this request cancels its I/O
                record.upstream_start()
                with DisconnectWatch(receive, scope) as watch:  # until the answer starts
                    # no more upstream at once than the model serves (control/upstream.py)
                    upstream = await open_upstream(stack, self.s, model, body, chat.accept)
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
            raise ended_by(ticket)

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
