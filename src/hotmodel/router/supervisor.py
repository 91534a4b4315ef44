"""The router supervisor: starts, watches and stops the one ``llama-server`` router.

State is owned here and changes only in this class::

    STOPPED --start()--> STARTING --/health ok--> RUNNING --stop()--> STOPPING --> STOPPED
                            |                        |
                            +------ process exit ----+--> EXITED   (unexpected exit)

Every wait has a deadline: ``router.startup_timeout_seconds`` for ``/health``,
``router.stop_timeout_seconds`` between SIGTERM and SIGKILL, then
:data:`KILL_WAIT_S` for the kernel to reap what was killed (which also bounds
the wait for the exit watcher). Process trees are handled with psutil so that
stopping works the same on Linux, macOS and Windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import psutil

from hotmodel.config import Config
from hotmodel.errors import RouterBinaryError, RouterExitedError, RouterStartError
from hotmodel.router.client import RouterClient

log = logging.getLogger("hotmodel.supervisor")

# After SIGKILL, how long to wait for the kernel to reap the processes.
KILL_WAIT_S = 5.0
_HEALTH_POLL_S = 0.05


class RouterState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


def router_argv(config: Config, binary: Path, presets_file: Path, port: int) -> list[str]:
    """The router's command line, derived from ``[router]`` (pure; tested on its own)."""
    r = config.router
    return [
        str(binary),
        "--models-preset",
        str(presets_file),
        "--models-max",
        str(r.models_max),
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
        *r.extra_args,
    ]


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
    ) -> None:
        self._config = config
        self._binary = binary
        self._client = client
        self.port = port
        self._on_exit = on_exit
        self.state = RouterState.STOPPED
        self.exit_code: int | None = None
        self.started_at: float | None = None
        self.log_file = config.router_log_file
        self.presets_file = config.server.state_dir / "router-presets.ini"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._exited = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def argv(self) -> list[str]:
        return router_argv(self._config, self._binary, self.presets_file, self.port)

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
        self.state = RouterState.STARTING
        self.presets_file.parent.mkdir(parents=True, exist_ok=True)
        self.presets_file.write_text(self._config.presets.render(), encoding="utf-8")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = self.log_file.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log_handle.write(f"\n=== hotmodel {stamp}: {' '.join(self.argv)}\n".encode())
        self._log_handle.flush()
        try:
            self._proc = _spawn(self.argv, self._log_handle, self.presets_file.parent)
        except OSError as exc:
            self._close_log()
            self.state = RouterState.STOPPED
            raise RouterBinaryError(f"cannot start {self._binary}: {exc}") from exc
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
                await asyncio.wait_for(self._exited.wait(), _HEALTH_POLL_S)

    async def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        # A thread blocked in wait() is the portable way to learn of an exit at
        # once (asyncio child watchers differ per platform and event loop).
        code = await asyncio.to_thread(proc.wait)
        self.exit_code = code
        self._exited.set()
        if self.state in (RouterState.RUNNING, RouterState.STARTING):
            self.state = RouterState.EXITED
            log.error(
                "llama-server router (pid %s) exited unexpectedly with code %s; log tail:\n%s",
                proc.pid,
                code,
                self.log_tail(15),
            )
            if self._on_exit is not None:
                self._on_exit(code)

    def ensure_running(self) -> None:
        """Raise :class:`RouterExitedError` unless the router is running."""
        if self.state is RouterState.EXITED:
            raise RouterExitedError(
                f"the llama-server router exited with code {self.exit_code}; "
                f"restart hotmodel serve (log: {self.log_file})"
            )
        if self.state is not RouterState.RUNNING:
            raise RouterExitedError(f"the llama-server router is {self.state.value}")

    async def stop(self) -> None:
        """Stop the router and every child: SIGTERM, then SIGKILL after the deadline."""
        proc = self._proc
        if proc is None:
            self.state = RouterState.STOPPED
            return
        if self.state is not RouterState.EXITED:
            self.state = RouterState.STOPPING
        await asyncio.to_thread(_terminate_tree, proc.pid, self._config.router.stop_timeout_seconds)
        if self._watcher is not None:
            # The process is gone (or was killed): its watcher ends at once. Bounded all
            # the same, so a stuck wait() can never hold up the shutdown.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._watcher), KILL_WAIT_S)
        self._proc = None
        self._close_log()
        self.state = RouterState.STOPPED

    def kill(self) -> None:
        """Kill the router and its children at once (a forced exit: no grace, no waiting)."""
        if self._proc is not None:
            _terminate_tree(self._proc.pid, 0)

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None


def _spawn(argv: list[str], log: IO[bytes], cwd: Path) -> subprocess.Popen[bytes]:
    # The router gets its own process group / session so that a Ctrl-C in the
    # terminal reaches hotmodel only; hotmodel then stops the router in order.
    # Popen returns at once (fork/exec), so calling it from async code is fine.
    own_group: dict[str, Any]
    if sys.platform == "win32":
        own_group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    else:
        own_group = {"start_new_session": True}
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, **own_group
    )


def _terminate_tree(pid: int, timeout: float) -> None:
    """Terminate ``pid`` and its descendants; kill whatever outlives ``timeout``."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    # On POSIX the router stops its own children on SIGTERM; on Windows
    # terminate() is a hard kill, so the children are asked directly as well.
    targets = procs if os.name == "nt" else [root]
    for p in targets:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        log.warning("process %s outlived the stop deadline; killing it", p.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=KILL_WAIT_S)
