"""The Starlette app: routes, error handlers, and the middleware that catches the unexpected."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from hotmodel.api.admin import admin_routes
from hotmodel.api.auth import RequireKeys
from hotmodel.api.chat import ChatCompletions
from hotmodel.api.errors import CatchUnexpected, on_hotmodel_error, on_http_error
from hotmodel.api.metrics import Metrics, metrics_routes
from hotmodel.api.observe import Observe
from hotmodel.api.openapi import openapi_routes
from hotmodel.api.sessions import session_routes
from hotmodel.api.status import status_routes
from hotmodel.api.ui import ui_routes
from hotmodel.errors import HotModelError
from hotmodel.runtime import Runtime


def create_app(runtime: Runtime) -> Starlette:
    """The app bound to a started :class:`Runtime` (its services are never None here)."""
    services = runtime.services
    metrics = Metrics()  # this app's own registry
    metrics.attach(runtime)  # gauges read at scrape; the engine's switches counted
    return Starlette(
        routes=[
            Route("/v1/chat/completions", ChatCompletions(services), methods=["POST"]),
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
            Middleware(RequireKeys, keys=lambda: services.config.keys),
        ],
        exception_handlers={
            HotModelError: on_hotmodel_error,
            HTTPException: on_http_error,
        },
    )
