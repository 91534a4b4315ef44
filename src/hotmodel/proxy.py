"""The OpenAI-compatible HTTP front: routes, error shape and the streaming relay.

The hot path (``POST /v1/chat/completions``) parses the body once, checks it,
names the model, and hands the bytes to the router; answers are relayed as
they arrive. A streamed answer is never buffered: each upstream chunk is sent
on at once, and when the client goes away the upstream request is closed, so
llama-server stops generating. Errors, ours and the router's, reach clients
in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from hotmodel.admin import admin_routes
from hotmodel.context import Message
from hotmodel.errors import (
    HotModelError,
    InvalidRequestError,
    ModelNotActiveError,
    RouterError,
    RouterProtocolError,
    RouterUnavailableError,
    SwitchCancelledError,
    SwitchFailedError,
    http_error_for,
)
from hotmodel.router_client import error_message, send
from hotmodel.runtime import ACTIVE_ALIAS, Runtime
from hotmodel.session_api import session_routes
from hotmodel.sessions import ReplyAssembler, SessionService
from hotmodel.traffic import Ticket, TrafficGate

log = logging.getLogger("hotmodel.proxy")

_JSON = "application/json"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def error_body(
    message: str, type_: str, code: str | int | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, type_: str, code: str | int | None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


def upstream_error_response(status: int, body: bytes) -> JSONResponse:
    """An error answer of the router, re-shaped as OpenAI's (its status kept)."""
    type_ = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return error_response(status, error_message(body), type_, "upstream_error")


def sse_error_event(message: str, code: str) -> bytes:
    return b"data: " + json.dumps(error_body(message, "server_error", code)).encode() + b"\n\n"


class UpstreamStream(Response):
    """Relays an open upstream SSE response chunk by chunk.

    A task watches for the client's ``http.disconnect``; when it comes, the
    relay is cancelled and the upstream response closed (which closes the
    connection, and llama-server stops the generation). The request's ticket
    is held until the relay ends, so a switch drains this stream, and a switch
    that cancels it ends it with an SSE error event.
    """

    def __init__(
        self,
        upstream: httpx.Response,
        ticket: Ticket,
        gate: TrafficGate,
        on_reply: Callable[[Message], Awaitable[None]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            status_code=upstream.status_code,
            media_type="text/event-stream",
            headers={**_SSE_HEADERS, **(headers or {})},
        )
        # Response() adds "content-length: 0" for its empty body; a stream has none.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._upstream = upstream
        self._ticket = ticket
        self._gate = gate
        self._on_reply = on_reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                await self._relay(send)
                tg.cancel_scope.cancel()
        except OSError:
            pass  # the client went away while we were sending
        finally:
            with anyio.CancelScope(shield=True):
                await self._upstream.aclose()
            self._gate.leave(self._ticket)

    async def _relay(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        tail = b""
        assembler = ReplyAssembler() if self._on_reply is not None else None
        with anyio.CancelScope() as relay_scope:
            self._ticket.bind(relay_scope)
            try:
                async for chunk in self._upstream.aiter_raw():
                    if assembler is not None:
                        assembler.feed(chunk)
                        reply = assembler.message()
                        if reply is not None and self._on_reply is not None:
                            # Stored before the client sees the chunk that ends the
                            # answer, so a client that reads the session right after
                            # the stream finds the answer there.
                            with anyio.CancelScope(shield=True):
                                await self._on_reply(reply)
                            self._on_reply = None
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                log.warning("upstream stream broke: %r", exc)
                tail = sse_error_event(
                    f"the router's stream broke: {exc!r}", "upstream_stream_error"
                )
        if relay_scope.cancelled_caught:
            tail = sse_error_event(self._ticket.cancel_reason or "cancelled", "switch_cancelled")
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def _reply_of(data: bytes) -> Message:
    """The assistant message of a (non-streamed) chat completion."""
    try:
        message = json.loads(data)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RouterProtocolError(f"the router's answer has no message: {exc!r}") from exc
    if not isinstance(message, dict):
        raise RouterProtocolError("the router's answer has no message object")
    return {k: v for k, v in message.items() if v is not None}


def _parse_chat_body(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    messages = payload.get("messages")
    if messages is None:
        raise InvalidRequestError("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array", param="messages")
    if "stream" in payload and not isinstance(payload["stream"], bool):
        raise InvalidRequestError("'stream' must be true or false", param="stream")
    return payload


def create_app(runtime: Runtime) -> Starlette:
    """The Starlette app bound to a started :class:`Runtime`."""

    gate = runtime.gate
    switch_cfg = runtime.config.switch

    def sessions() -> SessionService:
        if runtime.sessions is None:
            raise RouterUnavailableError("hotmodel is not started")
        return runtime.sessions

    async def admit(requested: object) -> tuple[Ticket, str]:
        """Pass the gate (waiting out a switch), then name the model; auto-switch if asked."""
        ticket = await gate.enter(switch_cfg.queue_timeout_seconds)
        try:
            return ticket, runtime.resolve_model(requested)
        except ModelNotActiveError:
            gate.leave(ticket)
            if not switch_cfg.auto:
                raise
        assert isinstance(requested, str)  # resolve_model() only says "not active" for a preset
        report = await runtime.switch(requested)
        if report.outcome == "failed":
            raise SwitchFailedError(f"switching to {requested!r} failed: {report.error}", report)
        ticket = await gate.enter(switch_cfg.queue_timeout_seconds)
        try:
            return ticket, runtime.resolve_model(requested)
        except BaseException:
            gate.leave(ticket)
            raise

    async def chat_completions(request: Request) -> Response:
        payload = _parse_chat_body(await request.body())
        body_session = payload.pop("session_id", None)
        body_preset = payload.pop("preset", None)
        session_id = request.headers.get("x-session-id") or body_session
        preset = request.headers.get("x-preset") or body_preset
        if session_id is None and preset is not None:
            raise InvalidRequestError(
                "'preset' applies to a session: send X-Session-Id or session_id too",
                param="preset",
            )
        ticket, payload["model"] = await admit(payload.get("model"))
        model: str = payload["model"]
        ticket.model = model
        streaming = False
        try:
            prepared = None
            extra_headers: dict[str, str] = {}
            if session_id is not None:
                prepared = await sessions().prepare(session_id, preset, payload["messages"], model)
                payload["messages"] = prepared.prompt.messages()
                extra_headers["x-session-id"] = prepared.session_id
            router = runtime.ready_router()
            http = router_http(runtime)
            upstream_req = http.build_request(
                "POST",
                router.base_url + "/v1/chat/completions",
                content=json.dumps(payload, ensure_ascii=False).encode(),
                headers={"content-type": _JSON, "accept": request.headers.get("accept", "*/*")},
            )
            data = b""
            with anyio.CancelScope() as scope:
                ticket.bind(scope)
                try:
                    upstream = await send(http, upstream_req, stream=True)
                except httpx.HTTPError as exc:
                    raise RouterUnavailableError(
                        f"the router could not be reached: {exc!r}"
                    ) from exc
                if upstream.status_code < 400 and payload.get("stream"):
                    streaming = True
                    on_reply = None
                    if prepared is not None:
                        p = prepared

                        async def on_reply(reply: Message) -> None:
                            await sessions().complete(p, reply, model)

                    return UpstreamStream(upstream, ticket, gate, on_reply, extra_headers)
                try:
                    data = await upstream.aread()
                except httpx.HTTPError as exc:
                    raise RouterUnavailableError(f"the router's answer broke: {exc!r}") from exc
                finally:
                    with anyio.CancelScope(shield=True):
                        await upstream.aclose()
            if scope.cancelled_caught:
                raise SwitchCancelledError(ticket.cancel_reason or "cancelled by a switch")
            if upstream.status_code >= 400:
                return upstream_error_response(upstream.status_code, data)
            if prepared is not None:
                await sessions().complete(prepared, _reply_of(data), model)
            return Response(
                data, status_code=upstream.status_code, media_type=_JSON, headers=extra_headers
            )
        finally:
            if not streaming:
                gate.leave(ticket)

    async def list_models(request: Request) -> Response:
        statuses: dict[str, str] = {}
        if runtime.router is not None:
            try:
                statuses = {k: v.value for k, v in (await runtime.router.models()).items()}
            except RouterError:
                statuses = {}
        data = [
            {
                "id": name,
                "object": "model",
                "owned_by": "hotmodel",
                "created": 0,
                "status": statuses.get(name, "unknown"),
                "active": name == runtime.active_model,
            }
            for name in runtime.config.presets.models
        ]
        return JSONResponse(
            {"object": "list", "data": data, "active": runtime.active_model, "alias": ACTIVE_ALIAS}
        )

    async def health(request: Request) -> Response:
        ok = runtime.state.value == "ready" and runtime.active_model is not None
        body = {
            "status": "ok" if ok else "unavailable",
            "state": runtime.state.value,
            "active_model": runtime.active_model,
            "switching": runtime.engine is not None and runtime.engine.busy,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            *admin_routes(runtime),
            *session_routes(runtime),
        ],
        exception_handlers={
            HotModelError: _hotmodel_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )


def router_http(runtime: Runtime) -> httpx.AsyncClient:
    if runtime.http is None:
        raise RouterUnavailableError("hotmodel is not started")
    return runtime.http


async def _hotmodel_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HotModelError)
    mapped = http_error_for(exc)
    param = getattr(exc, "param", None)
    resp = error_response(mapped.status, str(exc), mapped.type, mapped.code, param)
    if mapped.status == 503:
        resp.headers["retry-after"] = "5"
    return resp


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else f"http_{exc.status_code}"
    message = (
        f"no route {request.method} {request.url.path}"
        if exc.status_code in (404, 405)
        else str(exc.detail)
    )
    return error_response(exc.status_code, message, "invalid_request_error", code)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {exc!r}", "server_error", "internal_error")
