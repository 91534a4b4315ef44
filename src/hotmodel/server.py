"""``hotmodel serve``: start-up, serving and shutdown, in that order, with signals handled.

The listening socket is bound first (a busy port fails before any process is
spawned), then the :class:`~hotmodel.runtime.Runtime` starts the router and
loads the default model, then uvicorn serves the proxy. SIGINT/SIGTERM (and
Ctrl-Break on Windows) at any point lead to the same place: the runtime is
closed, which stops the router and its children. hotmodel installs the signal
handlers itself, for the whole run, so that a signal during start-up (before
uvicorn runs) cannot leave an orphaned llama-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Generator, Iterator

import uvicorn

from hotmodel.config import Config
from hotmodel.errors import HotModelError
from hotmodel.proxy import create_app
from hotmodel.runtime import Runtime

log = logging.getLogger("hotmodel.server")


class ServeInterruptedError(HotModelError):
    """A stop signal arrived before start-up finished (nothing is left running)."""


class _Server(uvicorn.Server):
    # hotmodel owns signal handling for the whole run (see module docstring);
    # uvicorn's own capture would re-raise the signal after serve() returns.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.contextmanager
def _stop_on_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> Iterator[None]:
    if sys.platform == "win32":
        # No loop.add_signal_handler on Windows: plain handlers that wake the loop.
        sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGBREAK]
        previous = {
            sig: signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop)) for sig in sigs
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    else:
        sigs = [signal.SIGINT, signal.SIGTERM]
        for sig in sigs:
            loop.add_signal_handler(sig, stop)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)


def bind_socket(host: str, port: int) -> socket.socket:
    """The proxy's listening socket, bound before anything is spawned.

    ``proto`` must say TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY)
    only on accepted sockets whose proto is IPPROTO_TCP. With proto 0 every
    small response waited ~40 ms for the client's delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise HotModelError(f"cannot listen on {host}:{port} ([server] host/port): {exc}") from exc
    sock.set_inheritable(True)
    return sock


async def serve(config: Config) -> None:
    """Run hotmodel until a stop signal; raise a HotModelError if start-up fails."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    with (
        _stop_on_signals(loop, stop.set),
        bind_socket(config.server.host, config.server.port) as sock,
    ):
        runtime = Runtime(config)
        starting = asyncio.create_task(runtime.start(), name="runtime-start")
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()  # start() closes what it opened before re-raising
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            raise ServeInterruptedError("stopped during start-up; nothing is left running")
        stopping.cancel()
        starting.result()  # start-up errors propagate (start() already cleaned up)
        try:
            host, port = sock.getsockname()[:2]
            log.info(
                "hotmodel ready on http://%s:%s (router pid %s, port %s; active model %r)",
                host,
                port,
                runtime.supervisor.pid if runtime.supervisor else None,
                runtime.supervisor.port if runtime.supervisor else None,
                runtime.active_model,
            )
            server = _Server(
                uvicorn.Config(
                    create_app(runtime),
                    lifespan="off",
                    log_level=config.server.log_level,
                    access_log=config.server.log_level == "debug",
                    timeout_graceful_shutdown=5,
                )
            )
            serving = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
            stopping = asyncio.create_task(stop.wait(), name="stop-signal")
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            server.should_exit = True
            stopping.cancel()
            await serving
        finally:
            log.info("stopping the router")
            await runtime.close()
            log.info("stopped")
