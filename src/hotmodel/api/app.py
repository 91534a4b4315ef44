"""The app: routes, error handlers, and the middleware that catches the unexpected.

Chat requests take a shorter way than the rest (:class:`ChatFirst`): the same
three middlewares around the endpoint, without Starlette's router and its two
exception layers, which every request would otherwise pass through twice (in,
and with each message sent).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotmodel.api.admin import admin_routes
from hotmodel.api.auth import RequireKeys
from hotmodel.api.chat import ChatCompletions
from hotmodel.api.errors import (
    CatchUnexpected,
    hotmodel_error_response,
    on_hotmodel_error,
    on_http_error,
)
from hotmodel.api.metrics import Metrics, metrics_routes
from hotmodel.api.observe import Observe
from hotmodel.api.openapi import openapi_routes
from hotmodel.api.sessions import session_routes
from hotmodel.api.status import status_routes
from hotmodel.api.ui import ui_routes
from hotmodel.errors import HotModelError
from hotmodel.runtime import Runtime
from hotmodel.security import KeySet

CHAT_PATH = "/v1/chat/completions"


def create_app(runtime: Runtime) -> ASGIApp:
    """The app bound to a started :class:`Runtime` (its services are never None here)."""
    services = runtime.services
    metrics = Metrics()  # this app's own registry
    metrics.attach(runtime)  # gauges read at scrape; the engine's switches counted
    chat = ChatCompletions(services)

    def keys() -> KeySet:
        return services.config.keys  # asked per request: a reload may change them

    app = Starlette(
        routes=[
            Route(CHAT_PATH, chat, methods=["POST"]),
            *status_routes(runtime),
            *admin_routes(runtime),
            *session_routes(services.sessions, services.snapshots),
            *openapi_routes(),
            *ui_routes(runtime),
            *metrics_routes(metrics),
        ],
        middleware=[
            Middleware(Observe, metrics=metrics),  # outermost: sees every answer, 500s too
            Middleware(CatchUnexpected),
            Middleware(RequireKeys, keys=keys),
        ],
        exception_handlers={
            HotModelError: on_hotmodel_error,
            HTTPException: on_http_error,
        },
    )
    # "/v1/chat/completions/" is a 404, not a 307 to the same path on whatever host the
    # client's Host header named
    app.router.redirect_slashes = False
    fast = Observe(CatchUnexpected(RequireKeys(AnswerErrors(chat), keys=keys)), metrics=metrics)
    return ChatFirst(app, fast)


class ChatFirst:
    """``POST /v1/chat/completions`` goes straight to ``chat`` (the endpoint in the same
    middlewares as the app's); anything else, other methods on that path included, to
    ``app``."""

    def __init__(self, app: Starlette, chat: ASGIApp) -> None:
        self.app = app
        self.chat = chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH and scope["method"] == "POST":
            scope["app"] = self.app  # as Starlette sets it (Observe reads the routes there)
            await self.chat(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class AnswerErrors:
    """What the app's exception handlers do, for the chat path: a :class:`HotModelError`
    (or Starlette's ``HTTPException``) raised before the answer started becomes its
    OpenAI-shaped answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except (HotModelError, HTTPException) as exc:
            if started:
                raise  # too late for an answer of its own: CatchUnexpected logs it
            response: Response
            if isinstance(exc, HotModelError):
                response = hotmodel_error_response(exc)
            else:
                response = await on_http_error(Request(scope, receive), exc)
            await response(scope, receive, send)
