"""Every request gets an id, a timing, one access log line and its metrics, here.

:class:`Observe` is the outermost middleware: it creates the request's
:class:`~hotmodel.api.record.RequestRecord` (with the id that the error
handler for 500s quotes and the client gets as ``X-Request-Id``), captures the
status, and when the answer is over counts it in
:class:`~hotmodel.api.metrics.Metrics` and logs one line on
``hotmodel.access``. The route label is the route's template, found by a dict
lookup for fixed paths (the chat path among them) and by matching the app's
routes only for the others, so ids in paths and random 404s never become new
series ("other" is anything no route matches). Every answer also carries a
``Server-Timing`` header: hotmodel's own time apart from llama-server's, so a
client (or a benchmark) can see what the proxy costs without timing both.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotmodel.api.metrics import Metrics
from hotmodel.api.record import RECORD, RequestRecord, incoming_request_id, new_request_id

ACCESS = logging.getLogger("hotmodel.access")
OTHER_ROUTE = "other"
# Logged as they are; anything else is quoted (JSON string rules), so a path with
# spaces or newlines cannot forge a second line or field.
_PLAIN = re.compile(r"[A-Za-z0-9._~/:{}@+-]+")


class Observe:
    """ASGI middleware: request id, status, timing, metrics and the access log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._fixed: frozenset[str] | None = None  # route paths without parameters
        self._matched: list[Route | Mount] = []  # the others, matched in order

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(
            incoming_request_id(scope) or new_request_id(),
            scope["method"],
            scope["path"],
            time.perf_counter(),
        )
        record.route = self._route(scope)  # before routing changes root_path for mounts
        scope.setdefault("state", {})[RECORD] = record
        id_header = (b"x-request-id", record.request_id.encode("ascii"))

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                timing = (b"server-timing", record.server_timing(time.perf_counter()))
                message = {**message, "headers": [*message.get("headers", ()), id_header, timing]}
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            now = time.perf_counter()
            self.metrics.request_done(record, now)
            log_access(record, now)

    def _route(self, scope: Scope) -> str:
        if self._fixed is None:
            self._index(getattr(scope.get("app"), "routes", []))
        assert self._fixed is not None
        path: str = scope["path"]
        if path in self._fixed:
            return path
        for route in self._matched:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route.path
        return OTHER_ROUTE

    def _index(self, routes: list[BaseRoute]) -> None:
        fixed = set()
        for route in routes:
            if isinstance(route, Route) and not route.param_convertors:
                fixed.add(route.path)
            elif isinstance(route, (Route, Mount)):
                self._matched.append(route)
        self._fixed = frozenset(fixed)


def access_fields(record: RequestRecord, now: float) -> dict[str, Any]:
    """The access line's fields, in order (docs/operations.md, "Logs")."""
    upstream = record.upstream_seconds(now)
    usage = record.usage
    return {
        "request_id": record.request_id,
        "method": record.method,
        "path": record.path,
        "route": record.route,
        "status": record.status or 499,
        "model": record.model,
        "session": record.session,
        "ms": _ms(now - record.started),
        "upstream_ms": None if upstream is None else _ms(upstream),
        "ttft_ms": None if record.first_token is None else _ms(record.first_token - record.started),
        "prompt_tokens": None if usage is None else usage.prompt,
        "completion_tokens": None if usage is None else usage.completion,
        "cached_tokens": None if usage is None else usage.cached,
    }


class AccessLine:
    """The text form of an access line, built only when a handler formats it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{key}={_value(value)}" for key, value in self.fields.items())


def log_access(record: RequestRecord, now: float) -> None:
    """One line on ``hotmodel.access``; its fields also ride on the log record (``access``)
    so the JSON format writes them as keys."""
    if ACCESS.isEnabledFor(logging.INFO):
        fields = access_fields(record, now)
        ACCESS.info("%s", AccessLine(fields), extra={"access": fields})


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _value(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)
