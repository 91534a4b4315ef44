"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API
through the same door as chat (``api/anthropic.py`` has the pure parts).

llama-server serves both routes itself; hotmodel parses and checks, admits
(``api/admission.py``: the model, the queues, a switch's drain and hold), owns the
key's slot, forwards on the direct data path and relays (``api/forward.py``,
``api/relay.py``), as for every endpoint. ``count_tokens`` is one of the generic
endpoints (``api/inference.py``). ``/v1/messages`` adds sessions (``X-Session-Id``,
as on chat): the session's lock, then ``prepare`` (stored history + the new turns, as
chat messages), the prompt sent upstream rebuilt as Anthropic's ``system`` and
``messages``, and ``complete`` with the answer's text once it is whole (plain: its text
blocks; streamed: its ``text_delta`` events, stored before the event that ends the
stream is sent).

:class:`AnthropicErrors` gives every error answer on these routes Anthropic's shape,
whoever made it (the browser guard, the keys, a check, admission, llama-server).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotmodel.api import anthropic
from hotmodel.api.admission import Admission
from hotmodel.api.auth import came_with_admin_key, owner_of
from hotmodel.api.chat import chat_headers
from hotmodel.api.endpoints import Endpoint, Family
from hotmodel.api.errors import public_message, sse_error
from hotmodel.api.forward import Answer, answer, bound_length, ended_by, open_upstream
from hotmodel.api.inference import Inference, _upstream_error
from hotmodel.api.queued import EarlyStream
from hotmodel.api.record import RequestRecord, record_of, usage_of
from hotmodel.api.relay import DisconnectWatch, read_unless_gone, relay
from hotmodel.api.validate import parse_body, read_asgi_body
from hotmodel.config import Config
from hotmodel.control.fit import largest_context
from hotmodel.control.snapshots import Turn
from hotmodel.errors import HotModelError, InvalidRequestError
from hotmodel.router.chat_http import Upstream
from hotmodel.runtime import Services
from hotmodel.sessions.service import Prepared, SessionRef
from hotmodel.sse import SseParser

MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
# No tokenizer makes fewer than one token of this many characters (validate.py's bound)
_CHARS_PER_TOKEN = 64
# A stream's first event (message_start) is looked for in this many bytes at most
_OPENING_BYTES = 64 * 1024


def _budget(config: Config) -> int | None:
    context = largest_context(config.presets, config.router)
    return None if context is None else context * _CHARS_PER_TOKEN


def check_messages_request(payload: dict[str, Any], config: Config) -> None:
    anthropic.check_request(payload, config.server.max_messages, _budget(config))


def check_count_tokens(payload: dict[str, Any], config: Config) -> None:
    anthropic.check_request(payload, config.server.max_messages, _budget(config), count=True)


MESSAGES = Endpoint(
    MESSAGES_PATH,
    Family.COMPLETION,
    check_messages_request,
    "Anthropic Messages",
    streams=True,
    generates=True,
    slot_cache=True,
    in_slot=True,
    openai_fields=False,
)
COUNT_TOKENS = Endpoint(
    COUNT_TOKENS_PATH,
    Family.TEMPLATE,
    check_count_tokens,
    "Anthropic Messages: count the prompt's tokens",
    openai_fields=False,
)


class Messages:
    """The ASGI app behind ``POST /v1/messages``."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.e = MESSAGES
        self.admission = Admission(services)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = chat_headers(scope)
        limit = self.s.config.server.max_body_bytes
        body = await read_asgi_body(receive, headers.get("content-length", ""), limit)
        payload = parse_body(body)
        self.e.check(payload, self.s.config)
        session = None
        session_id = headers.get("x-session-id")
        if session_id is not None:
            prompt = headers.get("x-system-prompt")
            session = self.s.sessions.check(session_id, prompt, owner_of(scope))
            anthropic.to_chat(payload)  # a session holds text: refused here if not
        elif "x-system-prompt" in headers:
            raise InvalidRequestError(
                "X-System-Prompt applies to a session: send X-Session-Id too",
                param="X-System-Prompt",
            )
        record = record_of(scope) or RequestRecord.detached()
        stream = bool(payload.get("stream"))
        record.stream = stream
        if session is not None:
            record.session = session.id
        early = None
        if stream:
            early = EarlyStream(
                send, {} if session is None else {"x-session-id": session.id}, scope
            )
            send = early.send

        async def attempt(to: Send) -> Response | Answer | None:
            return await self._answer(
                payload, session, headers.get("accept", "*/*"), scope, record, receive, to, early
            )

        await answer(self.s, attempt, payload, early, record, scope, receive, send)

    async def _answer(
        self,
        payload: dict[str, Any],
        session: SessionRef | None,
        accept: str,
        scope: Scope,
        record: RequestRecord,
        receive: Receive,
        send: Send,
        early: EarlyStream | None,
    ) -> Response | Answer | None:
        """Forward the request; relays a stream itself (None), else returns the answer."""
        s = self.s
        owner = owner_of(scope)
        async with contextlib.AsyncExitStack() as stack:
            if session is not None:
                timeout = s.config.session.queue_timeout_seconds
                await stack.enter_async_context(s.sessions.hold(session, timeout))
            ticket = await stack.enter_async_context(
                self.admission.admitted(
                    payload.get("model"),
                    receive,
                    owner=owner,
                    admin=came_with_admin_key(scope),
                    session=session,
                    tell=None if early is None else early.tell,
                )
            )
            model = ticket.model
            assert model is not None  # admitted() names it
            payload["model"] = record.model = model
            bound_length(s.config, payload, model)
            prepared: Prepared | None = None
            headers: dict[str, str] = {}
            if session is not None:
                prepared = await s.sessions.prepare(session, anthropic.to_chat(payload), model)
                system, messages = anthropic.from_chat(prepared.prompt.messages())
                payload.pop("system", None)
                if system is not None:
                    payload["system"] = system
                payload["messages"] = messages
                headers["x-session-id"] = prepared.session_id
            await stack.enter_async_context(self.admission.own_slot(payload, model, owner))
            gen = s.sessions.slots.touch(model)  # a session's turn labels it once complete
            if prepared is not None:
                prepared.slot_gen = gen
            body = json.dumps(payload, ensure_ascii=False).encode()
            with anyio.CancelScope() as cancel:
                ticket.bind(cancel)  # a switch that cancels this request cancels its I/O
                record.upstream_start()
                with DisconnectWatch(receive, cancel) as watch:  # until the answer starts
                    upstream = await open_upstream(
                        stack, s, model, body, accept, MESSAGES_PATH, "POST /v1/messages"
                    )
                if upstream.status_code >= 400:
                    error = await upstream.read()
                    record.upstream_done(error)
                    return _upstream_error(upstream.status_code, error, record.request_id)
                ended = functools.partial(self._turn_ended, payload, prepared, model, gen, record)
                if payload.get("stream"):
                    to = send if prepared is None else self._storing(send, prepared, model, record)
                    opening = _Opening(upstream, record)  # the prompt's counts: its first event
                    await relay(opening, ticket, receive, to, headers, None, record, ended)
                    return None
                data = await read_unless_gone(upstream, receive)
                if data is None:
                    return None  # the client left: llama-server is stopped, nothing stored
                record.upstream_done(data)
                if prepared is not None:
                    reply = anthropic.reply_of(data)
                    if reply is not None:
                        with anyio.CancelScope(shield=True):
                            await s.sessions.complete(prepared, reply, model)
                ended()
                return Answer(upstream.status_code, data, headers)
            if watch.gone:
                return None  # the client left while llama-server worked: it is stopped
            raise ended_by(ticket)

    def _turn_ended(
        self,
        payload: dict[str, Any],
        prepared: Prepared | None,
        model: str,
        gen: int,
        record: RequestRecord,
    ) -> None:
        """The first answer after a KV restore may prove it (its ``cache_n``: Anthropic's
        ``cache_read_input_tokens``), as a chat turn does."""
        if self.s.snapshots is None or record.usage is None:
            return
        self.s.snapshots.turn_ended(
            Turn(
                model,
                gen,
                None if prepared is None else (prepared.owner, prepared.session_id),
                None if prepared is None else prepared.prompt.messages(),
                record.usage.cached,
                payload.get("cache_prompt") is not False,
            )
        )

    def _storing(self, send: Send, prepared: Prepared, model: str, record: RequestRecord) -> Send:
        """``send``, storing the streamed answer once whole, before the chunk that ends it
        goes to the client; when storing fails, an error event follows that chunk."""
        assembler: anthropic.StreamAssembler | None = anthropic.StreamAssembler()

        async def storing(message: Message) -> None:
            nonlocal assembler
            failed = b""
            if assembler is not None and message["type"] == "http.response.body":
                assembler.feed(message.get("body", b""))
                reply = assembler.message()
                if reply is not None:
                    assembler = None
                    try:
                        with anyio.CancelScope(shield=True):
                            await self.s.sessions.complete(prepared, reply, model)
                    except HotModelError as exc:  # the answer goes on; the client is told
                        text = public_message(
                            exc, record.request_id, "the answer was not stored in the session"
                        )
                        failed = sse_error(text, "store_error")
            await send(message)
            if failed:
                await send({"type": "http.response.body", "body": failed, "more_body": True})

        return storing


class _Opening(Upstream):
    """A stream relayed chunk by chunk, whose first event (``message_start``, with the
    prompt's token counts: the last event has only the answer's) is read into the
    record on the way (only ``chunks`` and ``status_code`` are read by the relay)."""

    def __init__(self, inner: Upstream, record: RequestRecord) -> None:
        self.status_code = inner.status_code
        self._inner = inner
        self._record = record

    async def chunks(self) -> AsyncIterator[bytes]:
        parser: SseParser | None = SseParser()
        seen = 0
        async for chunk in self._inner.chunks():
            if parser is not None:
                seen += len(chunk)
                for event in parser.feed(chunk):
                    if event.event == "message_start" or '"message_start"' in event.data[:64]:
                        self._record.opening = usage_of(event.data.encode())
                        parser = None
                        break
                if seen > _OPENING_BYTES:
                    parser = None
            yield chunk


class AnthropicErrors:
    """ASGI middleware: on ``/v1/messages*``, an error answer (status >= 400) gets
    Anthropic's shape, and a stream's error events ``event: error``; other routes pass."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(MESSAGES_PATH):
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # an error answer's head, until its body is whole
        chunks: list[bytes] = []
        streaming = False

        async def reshaping(message: Message) -> None:
            nonlocal held, streaming
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    held = message
                    return
                streaming = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                    for k, v in message.get("headers", ())
                )
                await send(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            if held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = anthropic.reshape_error(held["status"], b"".join(chunks))
                heads = [
                    (k, v)
                    for k, v in held.get("headers", ())
                    if k.lower() not in (b"content-length", b"content-type")
                ]
                heads += [(b"content-type", b"application/json"),
                          (b"content-length", b"%d" % len(body))]  # fmt: skip
                await send({**held, "headers": heads})
                await send({"type": "http.response.body", "body": body})
                return
            if streaming:
                body = anthropic.reshape_events(message.get("body", b""))
                message = {**message, "body": body}
            await send(message)

        await self.app(scope, receive, reshaping)


def messages_routes(services: Services) -> list[Route]:
    return [
        Route(MESSAGES_PATH, Messages(services), methods=["POST"]),
        Route(COUNT_TOKENS_PATH, Inference(services, COUNT_TOKENS), methods=["POST"]),
    ]
