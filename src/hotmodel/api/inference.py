"""Every inference endpoint besides chat (``api/endpoints.py``'s table), through the same
door as chat: parse and check, admit (``api/admission.py``), own the slot where the
prompt cache is used, forward on the direct data path and relay (``api/forward.py``,
``api/relay.py``).

As in ``api/chat.py``, each endpoint is a plain ASGI app so that one coroutine owns
what a request acquires (its ticket, its slot, its place upstream, the upstream
answer) on one ``AsyncExitStack``, released on every path; a client that leaves stops
llama-server. These requests store nothing; a subclass's hooks may (``api/responses.py``:
a Responses chain, which is a session at a switch: ``Call.session``).
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from hotmodel.api.admission import Admission
from hotmodel.api.auth import came_with_admin_key, owner_of
from hotmodel.api.endpoints import ENDPOINTS, Endpoint, check_serves
from hotmodel.api.errors import error_response, upstream_error_response
from hotmodel.api.forward import Answer, answer, bound_length, ended_by, open_upstream
from hotmodel.api.queued import EarlyStream
from hotmodel.api.record import RequestRecord, record_of
from hotmodel.api.relay import DisconnectWatch, read_unless_gone, relay
from hotmodel.api.validate import check_fields, parse_body, read_asgi_body
from hotmodel.router.chat_http import Upstream
from hotmodel.router.models import error_of
from hotmodel.runtime import Services
from hotmodel.sessions.service import SessionRef


@dataclass
class Call:
    """One request to an endpoint, as parsed at the door."""

    payload: dict[str, Any]
    stream: bool
    accept: str
    owner: str  # the API key's fingerprint ('' when keys are off)
    admin: bool  # it came with an admin key
    early: EarlyStream | None  # a stream: told its place while it waits in a queue
    state: Any = None  # what a subclass keeps between its hooks (api/responses.py)
    session: SessionRef | None = None  # whose KV a switch for it restores (or replays)
    gen: int = 0  # the slot ledger's generation of the request (an in-slot endpoint's)


def _headers(scope: Scope) -> tuple[str, str]:
    """``Content-Length`` and ``Accept`` (the first of each), in one pass."""
    length, accept = "", ""
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"content-length" and not length:
            length = value.decode("latin-1")
        elif name == b"accept" and not accept:
            accept = value.decode("latin-1")
    return length, accept or "*/*"


def _upstream_error(status: int, body: bytes, request_id: str, path: str = "") -> Response:
    """llama-server's error answer in OpenAI's shape; its 501 ("This server does not
    support embeddings/reranking/infill...": the model cannot serve the endpoint) is the
    client's 400 ``unsupported_endpoint``, naming ``model``. Its 500 on ``/detokenize``
    is the client's 400 too: the token ids are all that request carries, and an id out
    of the model's vocabulary is what fails there (found by the fuzzer)."""
    if status == 501:
        message, _ = error_of(body)
        return error_response(
            400, message, "invalid_request_error", "unsupported_endpoint", "model"
        )
    if status == 500 and path == DETOKENIZE_PATH:
        message, _ = error_of(body)
        return error_response(
            400,
            f"llama-server could not detokenize these ids (one outside the model's "
            f"vocabulary?): {message}",
            "invalid_request_error",
            "invalid_tokens",
            "tokens",
        )
    return upstream_error_response(status, body, request_id)


DETOKENIZE_PATH = "/detokenize"


class Inference:
    """The ASGI app behind one of llama-server's inference endpoints."""

    def __init__(self, services: Services, endpoint: Endpoint) -> None:
        self.s = services
        self.e = endpoint
        self.what = f"POST {endpoint.path}"  # what an upstream failure names
        self.admission = Admission(services)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length, accept = _headers(scope)
        body = await read_asgi_body(receive, length, self.s.config.server.max_body_bytes)
        payload = parse_body(body)
        if self.e.openai_fields:
            check_fields(payload)  # the OpenAI parameters' types, as for chat
        self.e.check(payload, self.s.config)
        record = record_of(scope) or RequestRecord.detached()
        stream = self.e.streams and bool(payload.get("stream"))
        record.stream = stream
        early = EarlyStream(send, {}, scope) if stream else None
        if early is not None:
            send = early.send
        call = Call(payload, stream, accept, owner_of(scope), came_with_admin_key(scope), early)
        await self.prepare(call)  # before admission: a refusal here causes no switch

        async def attempt(to: Send) -> Response | Answer | None:
            return await self._answer(call, record, receive, to)

        await answer(self.s, attempt, payload, early, record, scope, receive, send)

    async def prepare(self, call: Call) -> None:
        """What a subclass does to a checked request before it is admitted."""

    async def answered(self, call: Call, data: bytes) -> bytes:
        """A whole successful answer, as the client gets it (a subclass may store it)."""
        return data

    def streamed(self, call: Call, upstream: Upstream) -> Upstream:
        """A successful stream, as it is relayed (a subclass may watch its events)."""
        return upstream

    def ended(self, call: Call, record: RequestRecord) -> None:
        """A successful answer ended (a stream: before its last bytes), its token counts
        in ``record`` (a subclass may prove a KV restore with them)."""

    async def _answer(
        self, call: Call, record: RequestRecord, receive: Receive, send: Send
    ) -> Response | Answer | None:
        """Forward ``call``; relays a stream itself (None), else returns the answer."""
        s, e, payload = self.s, self.e, call.payload
        check_serves(e, payload.get("model"), s.config)  # before it could cause a switch
        async with contextlib.AsyncExitStack() as stack:
            ticket = await stack.enter_async_context(
                self.admission.admitted(
                    payload.get("model"),
                    receive,
                    owner=call.owner,
                    admin=call.admin,
                    session=call.session,
                    tell=None if call.early is None else call.early.tell,
                )
            )
            model = ticket.model
            assert model is not None  # admitted() names it
            check_serves(e, model, s.config)  # "active" or omitted: the model it meant
            payload["model"] = record.model = model
            if e.generates:
                bound_length(s.config, payload, model)
            if e.slot_cache:
                await stack.enter_async_context(self.admission.own_slot(payload, model, call.owner))
            if e.in_slot:
                call.gen = s.sessions.slots.touch(model)  # its prompt replaces what was there
            body = json.dumps(payload, ensure_ascii=False).encode()
            with anyio.CancelScope() as scope:
                ticket.bind(scope)  # a switch that cancels this request cancels its I/O
                record.upstream_start()
                with DisconnectWatch(receive, scope) as watch:  # until the answer starts
                    upstream = await open_upstream(
                        stack, s, model, body, call.accept, e.path, self.what
                    )
                if upstream.status_code >= 400:
                    error = await upstream.read()
                    record.upstream_done(error)
                    return _upstream_error(
                        upstream.status_code, error, record.request_id, self.e.path
                    )
                if call.stream:
                    ended = functools.partial(self.ended, call, record)
                    streamed = self.streamed(call, upstream)
                    await relay(streamed, ticket, receive, send, {}, None, record, ended)
                    return None
                data = await read_unless_gone(upstream, receive)
                if data is None:
                    return None  # the client left: llama-server is stopped
                record.upstream_done(data)
                data = await self.answered(call, data)
                self.ended(call, record)
                return Answer(upstream.status_code, data, {})
            if watch.gone:
                return None  # the client left while llama-server worked: it is stopped
            raise ended_by(ticket)


def inference_routes(services: Services) -> list[Route]:
    """One route per endpoint of the table."""
    return [Route(e.path, Inference(services, e), methods=["POST"]) for e in ENDPOINTS]
