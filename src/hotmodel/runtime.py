"""The runtime: what ``hotmodel serve`` owns while it runs, as one async context manager.

It owns the shared HTTP client, the router supervisor, the traffic gate and
the switch engine (which owns the active model), and nothing else holds them:
the proxy reads them through this object. No
module-level globals. ``start()`` either returns with the router healthy and
the default model ``loaded``, or raises with nothing left running, even when
it is cancelled half-way (a Ctrl-C during start-up).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import httpx

from hotmodel.config import Config
from hotmodel.errors import (
    ConfigError,
    ModelNotActiveError,
    ModelNotFoundError,
    RouterUnavailableError,
)
from hotmodel.gpu import GpuProbe, NoGpu, detect_probe
from hotmodel.provision import find_llama_server
from hotmodel.router_client import RouterClient
from hotmodel.session_store import SessionStore
from hotmodel.sessions import SessionService
from hotmodel.supervisor import RouterSupervisor, free_port
from hotmodel.switch import Listener, SwitchEngine, SwitchReport
from hotmodel.traffic import TrafficGate

log = logging.getLogger("hotmodel.runtime")

ACTIVE_ALIAS = "active"
_T = TypeVar("_T")


class ServiceState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    ROUTER_EXITED = "router_exited"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Runtime:
    """Owns the HTTP client, the router supervisor and the active model."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = ServiceState.STOPPED
        self.started_at = time.monotonic()
        self.http: httpx.AsyncClient | None = None
        self.router: RouterClient | None = None
        self.supervisor: RouterSupervisor | None = None
        self.gate = TrafficGate()
        self.engine: SwitchEngine | None = None
        self.gpu: GpuProbe = NoGpu()
        self.store = SessionStore(config.session_store_file)
        self.sessions: SessionService | None = None
        # Switches started over HTTP run here, so a client that goes away
        # cannot cancel a switch half-way.
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def active_model(self) -> str | None:
        return self.engine.active if self.engine is not None else None

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        cfg = self.config
        self.state = ServiceState.STARTING
        self.started_at = time.monotonic()
        _check_default_model_file(cfg)
        binary = find_llama_server(cfg.router.llama_server)
        cfg.server.state_dir.mkdir(parents=True, exist_ok=True)
        port = cfg.router.port or free_port(cfg.router.host)
        # One pooled client for every call to the router; no overall timeout
        # because generations may stream for minutes (per-call timeouts apply).
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.server.request_timeout_seconds, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            trust_env=False,
        )
        self.router = RouterClient(self.http, f"http://{_url_host(cfg.router.host)}:{port}")
        self.supervisor = RouterSupervisor(
            cfg, binary, self.router, port, on_exit=self._router_exited
        )
        try:
            await self.store.open()
            self.sessions = SessionService(cfg, self.store, self.router)
            self.gpu = await asyncio.to_thread(detect_probe, cfg.switch.gpu_probe)
            baseline = await asyncio.to_thread(self.gpu.snapshot)
            await self.supervisor.start()
            model = cfg.router.default_model
            log.info("loading default model %r", model)
            t0 = time.monotonic()
            await self.router.load_and_wait(
                model, cfg.switch.load_timeout_seconds, log_tail=self.supervisor.log_tail
            )
            log.info("model %r loaded in %.0f ms", model, (time.monotonic() - t0) * 1000)
            self.engine = SwitchEngine(
                config=cfg.switch,
                drain_timeout=cfg.server.switch_drain_timeout_seconds,
                router=self.router,
                gate=self.gate,
                presets=cfg.presets.models,
                active=model,
                gpu=self.gpu,
                log_tail=self.supervisor.log_tail,
                replay=self.sessions.replay,
                baseline_mib=None if baseline is None else baseline.used_mib,
            )
            if self.state is ServiceState.STARTING:
                self.state = ServiceState.READY
        except BaseException:
            await self.close()
            raise

    def _router_exited(self, code: int) -> None:
        self.state = ServiceState.ROUTER_EXITED

    async def switch(self, target: str, listener: Listener | None = None) -> SwitchReport:
        """Switch the active model; the switch goes on even if the caller is cancelled."""
        if self.engine is None:
            raise RouterUnavailableError("hotmodel is not started")
        return await asyncio.shield(self.spawn(self.engine.switch(target, listener)))

    def spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Run ``coro`` as a task owned by the runtime (cancelled by :meth:`close`)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        self.state = ServiceState.STOPPING
        for task in list(self._tasks):
            task.cancel()
        try:
            if self.supervisor is not None:
                await self.supervisor.stop()
        finally:
            await self.store.close()
            if self.http is not None:
                await self.http.aclose()
            self.state = ServiceState.STOPPED

    def ready_router(self) -> RouterClient:
        """The router client, once the router is running; else a 503-mapped error."""
        if self.supervisor is None or self.router is None:
            raise RouterUnavailableError("hotmodel is not started")
        self.supervisor.ensure_running()
        return self.router

    def resolve_model(self, requested: object) -> str:
        """The preset a chat request goes to: ``"active"``/omitted/the active id, else an error."""
        active = self.active_model
        if active is None:
            raise RouterUnavailableError(
                "no model is loaded (the last switch and its rollback failed); "
                "switch to a model with POST /admin/switch"
            )
        if requested is None or requested in ("", ACTIVE_ALIAS, active):
            return active
        if not isinstance(requested, str):
            raise ModelNotFoundError("'model' must be a string", param="model")
        if requested not in self.config.presets.models:
            known = ", ".join([ACTIVE_ALIAS, *self.config.presets.models])
            raise ModelNotFoundError(
                f"model {requested!r} is not a preset (known: {known})", param="model"
            )
        raise ModelNotActiveError(
            f"model {requested!r} is a preset but not the active model ({active!r}); "
            "switch to it first (hotmodel switch / POST /admin/switch), enable "
            "[switch] auto, or send model 'active'",
            param="model",
        )

    def uptime(self) -> float:
        return time.monotonic() - self.started_at


def _check_default_model_file(cfg: Config) -> None:
    preset = cfg.presets.models[cfg.router.default_model]
    if preset.model_path is not None and not preset.model_path.is_file():
        raise ConfigError(
            cfg.presets.path,
            f"model file not found: {preset.model_path}",
            section=preset.name,
            key="model",
        )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
