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
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from hotmodel import __version__
from hotmodel.errors import (
    HotModelError,
    InvalidRequestError,
    RouterError,
    RouterUnavailableError,
    http_error_for,
)
from hotmodel.router_client import error_message
from hotmodel.runtime import ACTIVE_ALIAS, Runtime

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
    connection, and llama-server stops the generation).
    """

    def __init__(self, upstream: httpx.Response) -> None:
        super().__init__(
            status_code=upstream.status_code, media_type="text/event-stream", headers=_SSE_HEADERS
        )
        # Response() adds "content-length: 0" for its empty body; a stream has none.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._upstream = upstream

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
            await self._upstream.aclose()

    async def _relay(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self._upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            log.warning("upstream stream broke: %r", exc)
            await send(
                {
                    "type": "http.response.body",
                    "more_body": True,
                    "body": sse_error_event(
                        f"the router's stream broke: {exc!r}", "upstream_stream_error"
                    ),
                }
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})


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

    async def chat_completions(request: Request) -> Response:
        payload = _parse_chat_body(await request.body())
        payload["model"] = runtime.resolve_model(payload.get("model"))
        router = runtime.ready_router()
        http = router_http(runtime)
        upstream_req = http.build_request(
            "POST",
            router.base_url + "/v1/chat/completions",
            content=json.dumps(payload, ensure_ascii=False).encode(),
            headers={"content-type": _JSON, "accept": request.headers.get("accept", "*/*")},
        )
        try:
            upstream = await http.send(upstream_req, stream=True)
        except httpx.HTTPError as exc:
            raise RouterUnavailableError(f"the router could not be reached: {exc!r}") from exc
        if upstream.status_code >= 400 or not payload.get("stream"):
            try:
                data = await upstream.aread()
            except httpx.HTTPError as exc:
                raise RouterUnavailableError(f"the router's answer broke: {exc!r}") from exc
            finally:
                await upstream.aclose()
            if upstream.status_code >= 400:
                return upstream_error_response(upstream.status_code, data)
            return Response(data, status_code=upstream.status_code, media_type=_JSON)
        return UpstreamStream(upstream)

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
        ok = runtime.state.value == "ready"
        body = {
            "status": "ok" if ok else "unavailable",
            "state": runtime.state.value,
            "active_model": runtime.active_model,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def admin_status(request: Request) -> Response:
        sup = runtime.supervisor
        router: dict[str, Any] = {}
        if sup is not None:
            router = {
                "pid": sup.pid,
                "state": sup.state.value,
                "port": sup.port,
                "url": runtime.router.base_url if runtime.router else None,
                "exit_code": sup.exit_code,
                "log_file": str(sup.log_file),
                "argv": sup.argv,
                "uptime_seconds": sup.uptime(),
            }
        return JSONResponse(
            {
                "version": __version__,
                "state": runtime.state.value,
                "active_model": runtime.active_model,
                "uptime_seconds": round(runtime.uptime(), 3),
                "config": str(runtime.config.path),
                "presets": list(runtime.config.presets.models),
                "router": router,
            }
        )

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/admin/status", admin_status, methods=["GET"]),
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
