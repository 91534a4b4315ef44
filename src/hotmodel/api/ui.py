"""The dashboard: ``GET /ui`` and its static files, plus the admin endpoints it reads live.

The page is plain HTML, CSS and JavaScript shipped inside the package
(``hotmodel/ui/``): no build step, no framework, no CDN, so it works on a
machine without internet. The files are read once, when the app is built,
and served from memory; only names that exist there are served.

The page itself holds no data, so ``/ui`` is open even when keys are set: a
browser cannot send an ``Authorization`` header when it loads a page. Every
piece of data comes from ``/admin/*`` and ``/v1/*``, which keep their keys;
when they answer 401 the page asks for the admin key, keeps it in the tab's
``sessionStorage`` and sends it as ``Authorization: Bearer`` (the live feed
is read with ``fetch()`` for the same reason: ``EventSource`` cannot send
headers). A strict Content-Security-Policy allows only the page's own files.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hotmodel.api.errors import error_response
from hotmodel.api.events import event_routes
from hotmodel.api.logs import log_routes
from hotmodel.errors import HotModelError
from hotmodel.runtime import Runtime

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_HEADERS = {
    # revalidated on every load, so a new hotmodel's page is never mixed with an old script
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'",
}


class UiFileNotFoundError(HotModelError):
    """A dashboard file that does not exist (answered as a 404)."""


def load_files() -> dict[str, bytes]:
    """Every file of the packaged ``ui`` folder, by name (read once)."""
    folder = resources.files("hotmodel") / "ui"
    return {
        item.name: item.read_bytes()
        for item in folder.iterdir()
        if item.is_file() and any(item.name.endswith(suffix) for suffix in _TYPES)
    }


def _file_response(files: dict[str, bytes], name: str) -> Response:
    body = files.get(name)
    if body is None:
        return _not_found(name)
    media_type = next(t for suffix, t in _TYPES.items() if name.endswith(suffix))
    return Response(body, media_type=media_type, headers=_HEADERS)


def _not_found(name: str) -> Response:
    return error_response(404, f"no dashboard file {name!r}", "invalid_request_error", "not_found")


def ui_routes(runtime: Runtime) -> list[Route]:
    """The page, its files, and the two admin endpoints only the dashboard needs."""
    files = load_files()
    if "index.html" not in files:  # a broken install: say so at start, not per request
        raise UiFileNotFoundError("the dashboard's index.html is missing from the package")

    async def page(request: Request) -> Response:
        return _file_response(files, "index.html")

    async def asset(request: Request) -> Response:
        return _file_response(files, request.path_params["name"])

    return [
        Route("/ui", page, methods=["GET"]),
        Route("/ui/", page, methods=["GET"]),
        Route("/ui/{name}", asset, methods=["GET"]),
        *event_routes(runtime),
        *log_routes(runtime),
    ]
