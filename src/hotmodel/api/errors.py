"""Errors become responses here, in OpenAI's shape.

The shape: ``{"error": {"message", "type", "param", "code"}}``.

hotmodel's own errors are mapped by :func:`~hotmodel.errors.http_error_for`;
Starlette's (unknown route, wrong method) keep their status; an answer of the
router with an error status keeps its status. Anything unexpected is logged
once, with a request id, and the client gets a generic 500 carrying that id
and nothing internal (:class:`CatchUnexpected`).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotmodel import sse
from hotmodel.api.record import new_request_id, record_of
from hotmodel.errors import HotModelError, http_error_for
from hotmodel.router.models import error_of

log = logging.getLogger("hotmodel.api")

RETRY_AFTER_S = "5"


def error_body(
    message: str, type_: str, code: str | int | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, type_: str, code: str | int | None, param: str | None = None
) -> JSONResponse:
    resp = JSONResponse(error_body(message, type_, code, param), status_code=status)
    if status == 503:
        resp.headers["retry-after"] = RETRY_AFTER_S
    if status == 408:  # the request never arrived whole: the connection cannot be reused
        resp.headers["connection"] = "close"
    return resp


# llama-server answers 500 for a request it could not parse, and for image or audio
# parts sent to a model without a projector (mmproj): the request was at fault.
_PARSE_FAILURES = ("Failed to parse", "[json.exception.", "input is not supported")
_NOT_LOADED = "model is not loaded"


def upstream_error_response(status: int, body: bytes) -> JSONResponse:
    """An error answer of the router, re-shaped as OpenAI's (its status kept, except a
    500 that only says the request could not be parsed: that is the client's 400)."""
    message, upstream_type = error_of(body)
    if status == 500 and any(marker in message for marker in _PARSE_FAILURES):
        status = 400
    if status == 400 and message == _NOT_LOADED:
        # not the client's fault: the model's process died (the watchdog brings it back)
        return error_response(
            503,
            f"the model is not running right now ({message}); retry shortly",
            "server_error",
            "router_unavailable",
        )
    type_ = "invalid_request_error" if 400 <= status < 500 else "server_error"
    if upstream_type == "exceed_context_size_error":
        # OpenAI's code for it: clients trim the conversation and retry on this one
        return error_response(status, message, type_, "context_length_exceeded", "messages")
    return error_response(status, message, type_, "upstream_error")


def sse_error(message: str, code: str) -> bytes:
    """The last event of a stream that could not finish."""
    return sse.encode(error_body(message, "server_error", code))


def hotmodel_error_response(exc: HotModelError) -> JSONResponse:
    mapped = http_error_for(exc)
    param = getattr(exc, "param", None)
    return error_response(mapped.status, str(exc), mapped.type, mapped.code, param)


async def on_hotmodel_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HotModelError)
    return hotmodel_error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else f"http_{exc.status_code}"
    message = (
        f"no route {request.method} {request.url.path}"
        if exc.status_code in (404, 405)
        else str(exc.detail)
    )
    response = error_response(exc.status_code, message, "invalid_request_error", code)
    for name, value in (exc.headers or {}).items():  # 405's Allow, for one
        response.headers[name] = value
    return response


class CatchUnexpected:
    """ASGI middleware: an exception nothing else handled becomes a generic 500 (a client
    that left while sending its request is not one: no answer, nothing logged).

    Logged once here with the request's id (the one its access line and its
    ``X-Request-Id`` header carry), which the client also gets (Starlette's own
    ServerErrorMiddleware would re-raise it, and the server log it again).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # the client left while sending its request: nobody to answer (a 499)
        except Exception:
            record = record_of(scope)  # the request's one id, made by the Observe middleware
            request_id = record.request_id if record is not None else new_request_id()
            log.exception(
                "unexpected error on %s %s (request id %s)",
                scope.get("method"),
                scope.get("path"),
                request_id,
            )
            if started:
                return  # too late for a status: the connection ends the answer
            response = error_response(
                500,
                f"internal error (request id {request_id}); the server log has the details",
                "server_error",
                "internal_error",
            )
            if record is None:  # else Observe adds the header to every answer
                response.headers["x-request-id"] = request_id
            await response(scope, receive, send)
