"""Errors become responses here, in OpenAI's shape.

The shape: ``{"error": {"message", "type", "param", "code"}}``.

hotmodel's own errors are mapped by :func:`~hotmodel.errors.http_error_for`;
a client reads only their public message (what failed, in a user's words):
their ``detail`` (a library's exception text, an address, a path) is logged
here, once, with the request's id, which the message then names
(:func:`public_message`). Starlette's errors (unknown route, wrong method)
keep their status; an answer of the router with an error status keeps its
status. Anything unexpected is logged once, with a request id, and the client
gets a generic 500 carrying that id and nothing internal (:class:`CatchUnexpected`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotmodel import sse
from hotmodel.api.record import new_request_id, record_of
from hotmodel.errors import HotModelError, detail_of, http_error_for
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
# The router's answer when it could not reach the model's process (it died, and the
# router has not seen the exit yet): a plain-text 500 "proxy error: ...".
_PROXY_ERROR = "proxy error:"


def _model_gone(status: int, message: str) -> bool:
    """Whether the router said the model's own process is not there (not the client's
    fault, nor an error of the request: the watchdog loads it again)."""
    not_running = message.startswith("model name=") and message.endswith(" is not running")
    not_loaded = status == 400 and (message == _NOT_LOADED or not_running)
    return not_loaded or (status == 500 and message.startswith(_PROXY_ERROR))


def upstream_error_response(
    status: int, body: bytes, request_id: str | None = None
) -> JSONResponse:
    """An error answer of the router, re-shaped as OpenAI's (its status kept, except a
    500 that only says the request could not be parsed: that is the client's 400, and
    an answer that says the model's process is gone: a 503 ``model_unavailable``)."""
    message, upstream_type = error_of(body)
    if status == 500 and any(marker in message for marker in _PARSE_FAILURES):
        status = 400
    if _model_gone(status, message):
        log.warning(
            "the router answered %d %r: the model's process is gone (request id %s)",
            status,
            message,
            request_id,
        )
        return error_response(
            503,
            "the model's process is not running right now (it is being loaded again); "
            "retry shortly",
            "server_error",
            "model_unavailable",
        )
    type_ = "invalid_request_error" if 400 <= status < 500 else "server_error"
    if upstream_type == "exceed_context_size_error":
        # OpenAI's code for it: clients trim the conversation and retry on this one
        return error_response(status, message, type_, "context_length_exceeded", "messages")
    return error_response(status, message, type_, "upstream_error")


def sse_error(message: str, code: str) -> bytes:
    """The last event of a stream that could not finish."""
    return sse.encode(error_body(message, "server_error", code))


def public_message(exc: HotModelError, request_id: str | None, context: str = "") -> str:
    """What a client is told of ``exc`` (after ``context``, when given): its public
    message. What only the server may read (its ``detail``, or the foreign error it
    was raised from) is logged here, once, with ``request_id``, which the message
    then names."""
    text = f"{context}: {exc.public}" if context else exc.public
    cause = exc.__cause__
    hidden = exc.detail or (
        detail_of(cause) if cause is not None and not isinstance(cause, HotModelError) else None
    )
    if not hidden:
        return text
    request_id = request_id or new_request_id()  # a request with no record: tests only
    log.warning("%s (request id %s): %s", text, request_id, hidden)
    return f"{text} (request id {request_id}; the server log has the details)"


def hotmodel_error_response(exc: HotModelError, request_id: str | None = None) -> JSONResponse:
    mapped = http_error_for(exc)
    param = getattr(exc, "param", None)
    message = public_message(exc, request_id)
    response = error_response(mapped.status, message, mapped.type, mapped.code, param)
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, int | float):  # 429 queue_full: when a retry likely succeeds
        response.headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    for name, value in getattr(exc, "headers", {}).items():  # its capacity hints
        response.headers[name] = value
    return response


async def on_hotmodel_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HotModelError)
    record = record_of(request.scope)  # the request's one id, made by the Observe middleware
    return hotmodel_error_response(exc, record.request_id if record is not None else None)


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
