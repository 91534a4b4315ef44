"""The router supervisor: starts, watches, restarts and stops the one ``llama-server`` router.

State is owned here and changes only in this class::

    STOPPED --start()--> STARTING --/health ok--> RUNNING --stop()--> STOPPING --> STOPPED
                            |                        |  ^
                            +------ process exit ----+  |  restart(): ≤ [router] restart_attempts,
                                       |                |  backoff from restart_backoff_seconds
                                       v                |
                                    EXITED --restart()--+
                                       |
                                       +-- attempts exhausted --> FAILED

Every wait has a deadline: ``router.startup_timeout_seconds`` for ``/health``,
``router.stop_timeout_seconds`` between SIGTERM and SIGKILL, then
:data:`~hotmodel.router.processes.KILL_WAIT_S` for the kernel to reap what was
killed (which also bounds the wait for the exit watcher). Process trees are
handled in ``processes.py`` (psutil), the same on Linux, macOS and Windows.
The supervisor decides nothing about models: restarting the router is asked
for by the control loop (a ``Recover`` command), which then loads the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO

import psutil

from hotmodel.config import Config
from hotmodel.errors import RouterBinaryError, RouterError, RouterExitedError, RouterStartError
from hotmodel.presets import Presets
from hotmodel.router.client import RouterClient
from hotmodel.router.processes import KILL_WAIT_S, PidFile, Router, spawn, terminate_tree

log = logging.getLogger("hotmodel.supervisor")

_HEALTH_POLL_S = 0.05
API_KEY_ENV = "LLAMA_API_KEY"  # llama-server's --api-key, read from the environment
_RESTART_BACKOFF_MAX_S = 10.0
# After its tree's stop, how long the router's watcher gets to see it exit before the
# router is taken for one the stop missed (a dead process is seen at once; a kill then
# goes to a pid not yet reaped, so still ours, whatever the wait)
_EXIT_SEEN_S = 1.0


class RouterState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"  # it exited and could not be restarted


def router_argv(
    config: Config, binary: Path, presets_file: Path, port: int, spare: bool = False
) -> list[str]:
    """The router's command line, derived from ``[router]`` (pure; tested on its own).

    ``spare``: the router counts one model more than ``models_max``, for a model whose
    process exits while the next one loads (hotmodel, not the router, decides what
    loads: ``--no-models-autoload``). Each resident preset (``resident = true``) counts
    one more: ``[router] models_max`` counts the switched models only.
    """
    r = config.router
    residents = len(config.presets.residents)
    return [
        str(binary),
        "--models-preset",
        str(presets_file),
        "--models-max",
        str(r.models_max + spare + residents),
        "--no-models-autoload",
        "--host",
        r.host,
        "--port",
        str(port),
        "--parallel",
        str(r.parallel),
        "--ctx-size",
        str(r.ctx_size),
        "--cache-type-k",
        r.cache_type_k,
        "--cache-type-v",
        r.cache_type_v,
        *(["--slot-save-path", str(config.kv_dir)] if config.switch.kv_snapshots else []),
        *r.extra_args,
        # with keys, several tenants share the model: llama-server's host-memory prompt
        # cache could bring one key's prompt back for another's (sessions/tenants.py).
        # Last, so that extra_args cannot turn it back on.
        *(["--cache-ram", "0"] if config.keys.enabled else []),
    ]


def backend_key(router_pid: int) -> str | None:
    """The key a running router (hotmodel's, by pid) demands, read from its environment:
    for tools of the same user (benchmarks, tests) that compare with llama-server direct.
    None when the process is gone, has no key, or is another user's."""
    try:
        return psutil.Process(router_pid).environ().get(API_KEY_ENV)
    except psutil.Error:
        return None


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_taken(host: str, port: int) -> bool:
    """Whether another process listens on (or holds) ``host:port`` now: a router started
    there could not bind, and its health check would be answered by that other process."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if os.name != "nt":  # as llama-server binds: a closed socket's TIME_WAIT is no hold
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def read_tail(path: Path, lines: int = 25, max_bytes: int = 64_000) -> str:
    """The last ``lines`` lines of a log file ('' when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    tail = deque(data.decode("utf-8", errors="replace").splitlines(), maxlen=lines)
    return "\n".join(tail)


class RouterSupervisor:
    """Owns the router process: its state, pid, log file and exit code."""

    def __init__(
        self,
        config: Config,
        binary: Path,
        client: RouterClient,
        port: int,
        on_exit: Callable[[int], None] | None = None,
        spare: bool = False,
        api_key: str | None = None,
    ) -> None:
        self._config = config
        # the key llama-server (router and every model process) demands of each request:
        # handed over in the environment, which the router passes to its children and
        # no other user can read (never on the command line, which every user can)
        self._env = None if api_key is None else {**os.environ, API_KEY_ENV: api_key}
        self._binary = binary
        self._spare = spare  # see router_argv
        self._client = client
        self.port = port
        self.on_exit = on_exit
        self.state = RouterState.STOPPED
        self.exit_code: int | None = None
        self.started_at: float | None = None
        self.log_file = config.router_log_file
        self.presets_file = config.server.state_dir / "router-presets.ini"
        self.pid_file = PidFile(config.server.state_dir / "router.pid")
        self.restarts = 0
        self._stale = False  # the presets changed since this router started
        self._running_presets = config.presets  # what the running router read
        self._proc: subprocess.Popen[bytes] | None = None
        self._router: Router | None = None
        self._log_handle: IO[bytes] | None = None
        self._exited = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def binary(self) -> Path:
        return self._binary

    @property
    def ram_cache_shared(self) -> bool:
        """llama-server keeps prompts in RAM across slots (``--cache-ram``, on unless keys
        were set at start): with keys set later by a reload, no request may reuse a cache."""
        return not self._config.keys.enabled

    @property
    def argv(self) -> list[str]:
        return router_argv(self._config, self._binary, self.presets_file, self.port, self._spare)

    def uptime(self) -> float | None:
        """Seconds since the router was spawned (None when it never was)."""
        if self.started_at is None:
            return None
        return round(time.monotonic() - self.started_at, 3)

    def log_tail(self, lines: int = 25) -> str:
        return read_tail(self.log_file, lines)

    async def start(self) -> None:
        """Spawn the router and wait for ``/health``; on any failure nothing is left running."""
        if self.state is not RouterState.STOPPED:
            raise RuntimeError(f"start() in state {self.state.value}")
        if port_taken(self._config.router.host, self.port):
            raise RouterStartError(
                f"port {self.port} on {self._config.router.host} is in use by another "
                "process: the router cannot listen there ([router] port)"
            )
        self.state = RouterState.STARTING
        self.presets_file.parent.mkdir(parents=True, exist_ok=True)
        if self._config.switch.kv_snapshots:
            self._config.kv_dir.mkdir(parents=True, exist_ok=True)
        self.presets_file.write_text(self._config.presets.render(), encoding="utf-8")
        self._running_presets = self._config.presets
        self._stale = False
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = self.log_file.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log_handle.write(f"\n=== hotmodel {stamp}: {' '.join(self.argv)}\n".encode())
        self._log_handle.flush()
        try:
            self._proc = spawn(self.argv, self._log_handle, self.presets_file.parent, self._env)
        except OSError as exc:
            self._close_log()
            self.state = RouterState.STOPPED
            raise RouterBinaryError(f"cannot start {self._binary}: {exc}") from exc
        self._router = Router.of(self._proc.pid)
        self.pid_file.write(self._router)
        self.started_at = time.monotonic()
        self._exited.clear()
        self._watcher = asyncio.create_task(self._watch(self._proc), name="router-watch")
        try:
            await self._wait_healthy()
        except BaseException:
            await self.stop()
            raise
        self.state = RouterState.RUNNING
        log.info("router pid %s healthy on port %s", self.pid, self.port)

    async def _wait_healthy(self) -> None:
        timeout = self._config.router.startup_timeout_seconds
        deadline = time.monotonic() + timeout
        while True:
            if self._exited.is_set():
                raise RouterStartError(
                    f"llama-server exited during start-up with code {self.exit_code}"
                    f"\n--- llama-server log tail ({self.log_file}) ---\n{self.log_tail()}"
                )
            if await self._client.health():
                return
            if time.monotonic() >= deadline:
                raise RouterStartError(
                    f"llama-server did not answer /health within {timeout:g}s "
                    f"([router] startup_timeout_seconds)"
                    f"\n--- llama-server log tail ({self.log_file}) ---\n{self.log_tail()}"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_HEALTH_POLL_S):
                    await self._exited.wait()

    async def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        # A thread blocked in wait() is the portable way to learn of an exit at
        # once (asyncio child watchers differ per platform and event loop).
        code = await asyncio.to_thread(proc.wait)
        if proc is not self._proc:
            return  # a watcher of an earlier process that outlived its stop
        self.exit_code = code
        self._exited.set()
        if self.state in (RouterState.RUNNING, RouterState.STARTING):
            was_running = self.state is RouterState.RUNNING
            self.state = RouterState.EXITED
            log.error(
                "llama-server router (pid %s) exited unexpectedly with code %s; log tail:\n%s",
                proc.pid,
                code,
                self.log_tail(15),
            )
            # an exit during start-up is start()'s to report; only a running router's is news
            if was_running and self.on_exit is not None:
                self.on_exit(code)

    @property
    def running(self) -> bool:
        return self.state is RouterState.RUNNING

    @property
    def stale(self) -> bool:
        """The router runs with presets that :meth:`use_presets` has since replaced."""
        return self._stale

    def runs_preset(self, name: str) -> bool:
        """Whether the running router read preset ``name`` as it is configured now (a
        reload may have added or edited it since: the router reads its list at start)."""
        now = self._config.presets.models.get(name)
        return now is not None and self._running_presets.models.get(name) == now

    def use_presets(self, presets: Presets) -> None:
        """The next start renders ``presets`` (a reload); the running router knows the
        old ones until then (llama-server reads its preset list once, at start)."""
        if presets != self._config.presets:
            self._config = dataclasses.replace(self._config, presets=presets)
        # a reload taken back leaves the running router as good as new
        self._stale = presets != self._running_presets

    async def restart(self) -> None:
        """Start the router again after it exited (or was killed as hung).

        At most ``[router] restart_attempts`` tries, waiting ``restart_backoff_seconds``
        (doubling) between them; then the state is FAILED and RouterStartError says why.
        """
        cfg = self._config.router
        delay = cfg.restart_backoff_seconds
        last: RouterError | None = None
        for attempt in range(1, cfg.restart_attempts + 1):
            await self.stop()  # the old process' leftovers (model children), its log handle
            try:
                await self.start()
            except RouterError as exc:
                last = exc
                log.warning("router restart %d/%d failed: %s", attempt, cfg.restart_attempts, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RESTART_BACKOFF_MAX_S)
                continue
            self.restarts += 1
            log.info("router restarted (attempt %d)", attempt)
            return
        self.state = RouterState.FAILED
        raise RouterStartError(
            f"the router could not be restarted in {cfg.restart_attempts} attempt(s) "
            f"([router] restart_attempts): {last}"
        )

    def ensure_running(self) -> None:
        """Raise :class:`RouterExitedError` unless the router is running."""
        if self.state in (RouterState.EXITED, RouterState.FAILED):
            raise RouterExitedError(
                f"the llama-server router exited with code {self.exit_code} "
                f"and is {self.state.value}",
                detail=f"log: {self.log_file}",  # a path: for the server log only
            )
        if self.state is not RouterState.RUNNING:
            raise RouterExitedError(f"the llama-server router is {self.state.value}")

    async def stop(self) -> None:
        """Stop the router and every child: SIGTERM, then SIGKILL after the deadline."""
        proc, router = self._proc, self._router
        if proc is None or router is None:
            self.state = RouterState.STOPPED
            return
        if self.state is not RouterState.EXITED:
            self.state = RouterState.STOPPING
        await asyncio.to_thread(terminate_tree, router, self._config.router.stop_timeout_seconds)
        if self._watcher is not None and not await self._watched_exit(_EXIT_SEEN_S):
            # Its watcher's wait() has not returned: our own child still runs (its pid not
            # reaped, so still ours) though its tree's stop did not find it: never left
            # running, holding its port
            log.warning("router pid %s outlived its stop; killing it", proc.pid)
            proc.kill()
            await self._watched_exit(KILL_WAIT_S)
        self._proc = self._router = None
        self.pid_file.remove()
        self._close_log()
        self.state = RouterState.STOPPED

    async def _watched_exit(self, timeout: float) -> bool:
        """Whether the router's watcher saw it exit within ``timeout`` s (at once when it
        is gone; bounded, so a stuck wait() never holds up the shutdown)."""
        assert self._watcher is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._watcher)
        return self._watcher.done()

    def kill(self, forced_exit: bool = False) -> None:
        """Kill the router and its children at once (a forced exit, or a hung router:
        no grace, no waiting). A hung router's exit is then reported as usual (the
        watchdog brings it back); a forced exit's is no news: hotmodel is stopping."""
        if self._router is not None:
            if forced_exit:
                self.state = RouterState.STOPPING
            terminate_tree(self._router, 0, "killing it (a forced exit)" if forced_exit else None)

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
