"""The app: routes, error handlers, and the middleware that catches the unexpected.

Chat requests take a shorter way than the rest (:class:`ChatFirst`): the same
three middlewares and the same exception handlers around the endpoint, without
Starlette's router and its outer error layer, which every request would
otherwise pass through twice (in, and with each message sent).
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, ExceptionHandler, Receive, Scope, Send

from hotmodel.api.admin import admin_routes
from hotmodel.api.auth import RequireKeys
from hotmodel.api.browser import GuardBrowsers
from hotmodel.api.chat import ChatCompletions
from hotmodel.api.cluster import cluster_routes
from hotmodel.api.errors import (
    CatchUnexpected,
    on_hotmodel_error,
    on_http_error,
)
from hotmodel.api.inference import inference_routes
from hotmodel.api.messages import AnthropicErrors, messages_routes
from hotmodel.api.metrics import Metrics, metrics_routes
from hotmodel.api.observe import Observe
from hotmodel.api.openapi import openapi_routes
from hotmodel.api.placement import Place
from hotmodel.api.responses import responses_routes
from hotmodel.api.sessions import session_routes
from hotmodel.api.status import status_routes
from hotmodel.api.ui import ui_routes
from hotmodel.cluster.node import ClusterNode
from hotmodel.config import ServerConfig
from hotmodel.errors import HotModelError
from hotmodel.runtime import Runtime
from hotmodel.security import KeySet

CHAT_PATH = "/v1/chat/completions"
# What an error raised by a route becomes: an answer in OpenAI's shape.
HANDLERS: dict[Any, ExceptionHandler] = {
    HotModelError: on_hotmodel_error,
    HTTPException: on_http_error,
}


def create_app(runtime: Runtime) -> ASGIApp:
    """The app bound to a started :class:`Runtime` (its services are never None here)."""
    services = runtime.services
    metrics = Metrics()  # this app's own registry
    metrics.attach(runtime)  # gauges read at scrape; the engine's switches counted
    chat = ChatCompletions(services)

    def keys() -> KeySet:
        return services.config.keys  # asked per request: a reload may change them

    def server() -> ServerConfig:
        return services.config.server  # allowed hosts and origins, as keys

    def body_limit() -> int:
        return services.config.server.max_body_bytes

    def cluster() -> ClusterNode | None:
        return services.cluster

    app = Starlette(
        routes=[
            Route(CHAT_PATH, chat, methods=["POST"]),
            *inference_routes(services),  # completions, infill, embeddings, rerank, tokenizer
            *messages_routes(services),  # Anthropic Messages
            *responses_routes(services),  # OpenAI Responses, stored
            *status_routes(runtime),
            *admin_routes(runtime),
            *cluster_routes(services),  # /admin/cluster, and KV files for peers
            *session_routes(services.sessions, services.snapshots),
            *openapi_routes(),
            *ui_routes(runtime),
            *metrics_routes(metrics),
        ],
        middleware=[
            Middleware(Observe, metrics=metrics),  # outermost: sees every answer, 500s too
            Middleware(AnthropicErrors),  # /v1/messages: every error in Anthropic's shape
            Middleware(CatchUnexpected),
            Middleware(GuardBrowsers, server=server),  # before keys: a page has none
            Middleware(RequireKeys, keys=keys),
            Middleware(Place, cluster=cluster, limit=body_limit),  # in a cluster: where
        ],
        exception_handlers=dict(HANDLERS),
    )
    # "/v1/chat/completions/" is a 404, not a 307 to the same path on whatever host the
    # client's Host header named
    app.router.redirect_slashes = False
    # the same middlewares and the same exception handlers (Starlette's own layer), without
    # the router and its outer error layer
    answered = ExceptionMiddleware(chat, handlers=dict(HANDLERS))
    placed = Place(answered, cluster=cluster, limit=body_limit)
    door = GuardBrowsers(RequireKeys(placed, keys=keys), server=server)
    fast = Observe(CatchUnexpected(door), metrics=metrics)
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
