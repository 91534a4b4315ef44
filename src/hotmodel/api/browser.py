"""The browser door: no web page the user visits can drive or read this server.

A page on another site can send requests to ``127.0.0.1`` from the user's
browser. Three checks stop it, before keys and before any route:

- **Host** (DNS rebinding): a page whose own name resolves to 127.0.0.1 sends
  ``Host: its-name``; only the server's own names pass: the loopback names,
  ``[server] host``, ``[server] allowed_hosts``, and any IP literal (rebinding
  needs a name the attacker controls). 400 ``host_not_allowed``.
- **Origin** (cross-site requests, e.g. a ``text/plain`` POST that needs no
  CORS preflight): a request whose ``Origin`` is not this server's own
  (the same host and port as its ``Host``) nor in ``[server]
  allowed_origins`` gets 403 ``origin_not_allowed``; so does a write whose
  ``Sec-Fetch-Site`` says another site sent it.
- **Content type**: a POST/PUT/PATCH must name JSON (``application/json`` or
  ``application/*+json``) or no type at all, else 415
  ``unsupported_media_type``: the content types a page may send without a
  preflight (``text/plain``, forms) are not JSON.
- **One of each**: ``Host``, ``Origin``, ``Content-Type`` or ``Sec-Fetch-Site``
  sent twice gets 400 ``duplicate_header``.

CORS is off unless ``[server] allowed_origins`` lists origins; for those,
Starlette's ``CORSMiddleware`` answers preflights and adds the headers. The
decisions are pure (:func:`refusal`), read from the config on every request
(a reload may change it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from hotmodel.api.errors import error_response
from hotmodel.config import ServerConfig

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# what a server bound to every interface does not name itself by
_ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_ONCE = frozenset({"host", "origin", "content-type", "sec-fetch-site"})
CORS_HEADERS = [
    "authorization",
    "content-type",
    "x-session-id",
    "x-system-prompt",
    # Anthropic's SDKs (/v1/messages)
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
]
CORS_EXPOSED = [
    "x-request-id",
    "server-timing",
    "retry-after",
    "x-ratelimit-limit",
    "x-ratelimit-waiting",
]


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str
    code: str


def host_name(host: str) -> str:
    """``Host`` header value -> the bare, lower-case name (no port, no IPv6 brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(name: str, server: ServerConfig) -> bool:
    if name in LOOPBACK_NAMES or _is_ip(name) or "*" in server.allowed_hosts:
        return True
    own = {host_name(server.host)} - _ANY_ADDRESS
    return name in own or name in {host_name(h) for h in server.allowed_hosts}


def _netloc(scheme: str, netloc: str) -> str:
    netloc = netloc.lower()
    default = _DEFAULT_PORTS.get(scheme)
    return netloc[: -len(default) - 1] if default and netloc.endswith(f":{default}") else netloc


def origin_allowed(origin: str, host: str, server: ServerConfig) -> bool:
    """Same origin as the request's ``Host`` (any scheme: a TLS proxy in front), or listed."""
    if origin.rstrip("/") in server.allowed_origins or "*" in server.allowed_origins:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc:
        return False  # "null" (a sandboxed frame, a file:// page) is nobody's own origin
    return _netloc(parts.scheme, parts.netloc) in {
        _netloc("http", host),
        _netloc("https", host),
    }


def _content_type_ok(content_type: str) -> bool:
    """JSON, or none at all (a script's client; a browser names a type for every POST a
    page can send without a preflight, and sends ``Origin`` with each one anyway)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("", "application/json") or (
        media.startswith("application/") and media.endswith("+json")
    )


def refusal(
    method: str, headers: dict[str, str], server: ServerConfig, twice: str | None = None
) -> Refusal | None:
    """Why this request is refused at the door (None: it passes). Pure. ``twice``: a
    header the door reads that came more than once (which one counts would be a proxy's
    guess against ours)."""
    if twice is not None:
        return Refusal(400, f"send one {twice} header, not several", "duplicate_header")
    host = headers.get("host", "")
    if host and not host_allowed(host_name(host), server):
        return Refusal(
            400,
            f"Host {host_name(host)!r} is not this server's name (DNS rebinding?); "
            "add it to [server] allowed_hosts to serve it",
            "host_not_allowed",
        )
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(origin, host, server):
        return Refusal(
            403,
            "requests from another site's page are refused; list its origin in "
            "[server] allowed_origins to allow it",
            "origin_not_allowed",
        )
    fetch_site = headers.get("sec-fetch-site", "")
    if origin is None and method in _WRITES and fetch_site in ("cross-site", "same-site"):
        return Refusal(403, "requests from another site's page are refused", "origin_not_allowed")
    if method in _WITH_BODY and not _content_type_ok(headers.get("content-type", "")):
        return Refusal(
            415,
            "the body must be JSON (Content-Type: application/json)",
            "unsupported_media_type",
        )
    return None


def read_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[dict[str, str], str | None]:
    """The headers by name, and the first of :data:`_ONCE` that came more than once."""
    headers: dict[str, str] = {}
    twice = None
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if twice is None and name in _ONCE and name in headers:
            twice = name
        headers[name] = value.decode("latin-1")
    return headers, twice


class GuardBrowsers:
    """The checks above as ASGI middleware; CORS for ``allowed_origins`` (if any) around it."""

    def __init__(self, app: ASGIApp, server: Callable[[], ServerConfig]) -> None:
        self.app = app
        self.server = server
        self._cors: tuple[tuple[str, ...], ASGIApp] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = self.server()
        headers, twice = read_headers(scope.get("headers", []))
        refused = refusal(scope["method"], headers, server, twice)
        if refused is not None:
            response = error_response(
                refused.status, refused.message, "invalid_request_error", refused.code
            )
            await response(scope, receive, send)
            return
        if server.allowed_origins and "origin" in headers:
            await self._with_cors(server.allowed_origins)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _with_cors(self, origins: tuple[str, ...]) -> ASGIApp:
        """Starlette's CORS layer for these origins (rebuilt only when a reload changes them)."""
        if self._cors is None or self._cors[0] != origins:
            cors = CORSMiddleware(
                self.app,
                allow_origins=[o.rstrip("/") for o in origins],
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=CORS_HEADERS,
                expose_headers=CORS_EXPOSED,
                max_age=600,
            )
            self._cors = (origins, cors)
        return self._cors[1]
