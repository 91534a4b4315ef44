"""API keys at the door: ``Authorization: Bearer KEY`` for ``/v1/*``, llama.cpp's native
inference routes (``/completion``, ``/infill``, ``/tokenize``...: ``api/endpoints.py``)
and ``/admin/*``. Anthropic's routes (``/v1/messages*``) also take the key as
``x-api-key`` (what Anthropic's SDKs send; Claude Code's ``ANTHROPIC_AUTH_TOKEN`` is a
bearer token).

An ASGI middleware, so every route is covered without each one remembering
to check. ``/metrics`` needs the admin key, like ``/admin/*``. ``/health`` and
``/openapi.json`` stay open (probes and tools need them). The key's
fingerprint goes into ``scope["state"]["owner"]``: sessions belong to the key
that created them.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from hotmodel.api.endpoints import NATIVE_PATHS
from hotmodel.api.errors import error_response
from hotmodel.security import Access, KeySet, fingerprint

OWNER = "owner"
# Anthropic's routes: the key may come as x-api-key (api/messages.py)
ANTHROPIC_PREFIX = "/v1/messages"
ACCESS = "access"
# Scrapers send a bearer token too; what is loaded and how busy it is is admin business.
METRICS_PATH = "/metrics"


def owner_of(scope: Scope) -> str:
    """The fingerprint of the key a request came with ('' when keys are off)."""
    state = scope.get("state") or {}
    return str(state.get(OWNER, ""))


def came_with_admin_key(scope: Scope) -> bool:
    """Whether the request carried a valid admin key (false when keys are off)."""
    state = scope.get("state") or {}
    return state.get(ACCESS) is Access.ADMIN


class RequireKeys:
    """``keys`` is asked on every request: a reload may change the keys."""

    def __init__(self, app: ASGIApp, keys: Callable[[], KeySet]) -> None:
        self.app = app
        self.current = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.current()
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        anthropic = path.startswith(ANTHROPIC_PREFIX)
        if _authorizations(scope) > 1 or (anthropic and _count(scope, b"x-api-key") > 1):
            # which one would count is a proxy's guess against ours: refuse, keys or not
            response = error_response(
                400,
                "send one Authorization (or x-api-key) header, not several",
                "invalid_request_error",
                "multiple_authorization_headers",
            )
            await response(scope, receive, send)
            return
        if not keys.enabled:
            await self.app(scope, receive, send)
            return
        needs = Access.ADMIN if path.startswith("/admin") or path == METRICS_PATH else None
        if needs is None and (path.startswith("/v1") or path in NATIVE_PATHS) and keys.client:
            needs = Access.CLIENT
        if needs is None:
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        if presented is None and anthropic:
            presented = _api_key(scope)
        access = keys.check(presented)
        if access is None:
            response = error_response(
                401,
                "a valid API key is required (Authorization: Bearer KEY"
                + (", or x-api-key: KEY)" if anthropic else ")"),
                "invalid_request_error",
                "invalid_api_key",
            )
            response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        if needs is Access.ADMIN and access is not Access.ADMIN:
            response = error_response(
                403,
                "this endpoint needs an admin key ([security] admin_keys)",
                "invalid_request_error",
                "admin_key_required",
            )
            await response(scope, receive, send)
            return
        assert presented is not None
        state = scope.setdefault("state", {})
        state[OWNER], state[ACCESS] = fingerprint(presented), access
        await self.app(scope, receive, send)


def _authorizations(scope: Scope) -> int:
    return _count(scope, b"authorization")


def _count(scope: Scope, header: bytes) -> int:
    return sum(1 for name, _ in scope.get("headers", []) if name == header)


def _api_key(scope: Scope) -> str | None:
    """The key in ``x-api-key`` (Anthropic's header), if any."""
    for name, value in scope.get("headers", []):
        if name == b"x-api-key":
            return value.decode("latin-1").strip() or None
    return None


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None
