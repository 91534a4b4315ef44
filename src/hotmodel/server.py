"""``hotmodel serve``: start-up, serving and shutdown, in that order, with signals handled.

The listening socket is bound first (a busy port fails before any process is
spawned), then the :class:`~hotmodel.runtime.Runtime` starts the router and
loads the default model, then uvicorn serves the proxy. SIGINT/SIGTERM (and
Ctrl-Break on Windows) at any point lead to the same place: the runtime is
closed, which stops the router and its children. hotmodel installs the signal
handlers itself, for the whole run, so that a signal during start-up (before
uvicorn runs) cannot leave an orphaned llama-server. Shutdown is bounded:
uvicorn gets ``[server] shutdown_timeout_seconds`` to finish open requests; a
second signal forces the exit at once (the router tree is killed, not asked).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any

import uvicorn

from hotmodel.api.app import create_app
from hotmodel.api.framing import HttpProtocol
from hotmodel.config import Config
from hotmodel.control.traffic import SHUTTING_DOWN, TrafficGate
from hotmodel.errors import HotModelError
from hotmodel.runtime import Runtime

log = logging.getLogger("hotmodel.server")

# uvicorn's own graceful deadline comes this long after hotmodel's (which ends what is
# open itself): time for the ended requests to send their last bytes
GRACE_BACKSTOP_S = 2


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


@contextlib.contextmanager
def _reload_on_sighup(loop: asyncio.AbstractEventLoop, runtime: Runtime) -> Iterator[None]:
    """SIGHUP re-reads the config (``hotmodel reload`` is the same, over HTTP); the
    platforms without SIGHUP (Windows) have ``hotmodel reload`` only."""
    if not hasattr(signal, "SIGHUP") or sys.platform == "win32":
        yield
        return
    pending: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(_reload(runtime), name="reload")
        pending.add(task)  # kept until done: a task nobody holds may be collected
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


async def _reload(runtime: Runtime) -> None:
    from hotmodel.control.reload import reload_config

    try:
        await reload_config(runtime.services)
    except HotModelError as exc:
        log.error("SIGHUP: the config was not reloaded: %s", exc)


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


class _Signals:
    """The first stop signal asks for a graceful stop; a second one forces it (as uvicorn does)."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.forced = False

    async def forced_wait(self) -> None:
        while not self.forced:
            await self.force.wait()

    def __call__(self) -> None:
        if self.stop.is_set():
            log.warning("second stop signal: forcing the exit")
            self.forced = True
            self.force.set()
        else:
            log.info("stopping (a second Ctrl-C forces it)")
            self.stop.set()


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of ``aws`` is done; cancel and await the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve(config: Config) -> None:
    """Run hotmodel until a stop signal; raise a HotModelError if start-up fails."""
    loop = asyncio.get_running_loop()
    signals = _Signals()
    with (
        _stop_on_signals(loop, signals),
        bind_socket(config.server.host, config.server.port) as sock,
    ):
        runtime = Runtime(config)
        # A second signal kills the router tree at once, whatever is going on.
        killer = asyncio.create_task(_kill_on_force(signals, runtime), name="force-exit")
        try:
            await _serve(runtime, sock, signals)
        finally:
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killer


async def _end_open_requests(gate: TrafficGate, config: Config) -> None:
    """At the stop's deadline, end the requests still open, as a switch's cancel does: a
    stream gets a last SSE error event, a plain request a 503 ``shutting_down``. uvicorn
    would cancel them bare a little later (a cut stream, a traceback in the log)."""
    await asyncio.sleep(config.server.shutdown_timeout_seconds)
    ended = gate.cancel(None, "hotmodel is shutting down", SHUTTING_DOWN)
    if ended:
        log.info("ended %d open request(s) at the stop deadline", ended)


async def _kill_on_force(signals: _Signals, runtime: Runtime) -> None:
    while True:  # every further signal kills again (a router may be starting meanwhile)
        await signals.force.wait()
        signals.force.clear()
        runtime.kill_router()


async def _serve(runtime: Runtime, sock: socket.socket, signals: _Signals) -> None:
    config = runtime.config
    starting = asyncio.create_task(runtime.start(), name="runtime-start")
    await _first(asyncio.shield(starting), signals.stop.wait())
    if not starting.done():
        starting.cancel()  # start() closes what it opened before re-raising
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        finally:
            await runtime.close()  # in case start() finished before it saw the cancel
        raise ServeInterruptedError("stopped during start-up; nothing is left running")
    services = starting.result()  # start-up errors propagate (start() already cleaned up)
    try:
        host, port = sock.getsockname()[:2]
        log.info(
            "hotmodel ready on http://%s:%s (router pid %s, port %s; active model %r)",
            host,
            port,
            services.supervisor.pid,
            services.supervisor.port,
            services.controller.active,
        )
        server = _Server(
            uvicorn.Config(
                create_app(runtime),
                lifespan="off",
                http=HttpProtocol,  # httptools, with a JSON 400 for bytes that are not HTTP
                log_level=config.server.log_level,
                # uvicorn's loggers go to hotmodel's handler (text or JSON: hotmodel.logs),
                # and hotmodel.access writes the one line per request (api/observe.py)
                log_config=None,
                access_log=False,
                # X-Forwarded-* would be believed from any local client by default (and
                # is one more layer per request): hotmodel is what clients talk to.
                proxy_headers=False,
                # hotmodel ends what is still open at its own deadline (_end_open_requests);
                # uvicorn's, later, only backs it up
                timeout_graceful_shutdown=math.ceil(config.server.shutdown_timeout_seconds)
                + GRACE_BACKSTOP_S,
            )
        )
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
        with _reload_on_sighup(asyncio.get_running_loop(), runtime):
            await _first(asyncio.shield(serving), signals.stop.wait())
        services.feed.close()  # open dashboard streams end now, not at the graceful deadline
        server.should_exit = True
        ending = asyncio.create_task(_end_open_requests(services.gate, config), name="end-open")
        try:
            await _first(asyncio.shield(serving), signals.forced_wait())
        finally:
            ending.cancel()
        if not serving.done():
            server.force_exit = True
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
    finally:
        log.info("stopping the router")
        await runtime.close()
        log.info("stopped")
