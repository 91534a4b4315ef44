"""Scripted upstream HTTP servers for the chat data path's tests (real sockets, in-process).

The chat path talks HTTP over aiohttp to llama-server; these tests stand a
small aiohttp.web server in its place whose handler can stream, hang, break a
connection or notice that the client went away, so what the proxy does on
each of those is checked on a real connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from hotmodel.router.supervisor import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """Serve ``handler`` for every path on a free port; yields the base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    # a client that disconnects cancels its handler: how "llama-server stops" is seen
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = free_port("127.0.0.1")
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
