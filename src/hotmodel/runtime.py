"""The runtime: what ``hotmodel serve`` owns while it runs, as one async context manager.

It owns the shared HTTP client, the router supervisor and the active model,
and nothing else holds them: the proxy reads them through this object. No
module-level globals. ``start()`` either returns with the router healthy and
the default model ``loaded``, or raises with nothing left running, even when
it is cancelled half-way (a Ctrl-C during start-up).
"""

from __future__ import annotations

import enum
import logging
import time
from types import TracebackType

import httpx

from hotmodel.config import Config
from hotmodel.errors import (
    ConfigError,
    ModelNotActiveError,
    ModelNotFoundError,
    RouterUnavailableError,
)
from hotmodel.provision import find_llama_server
from hotmodel.router_client import RouterClient
from hotmodel.supervisor import RouterSupervisor, free_port

log = logging.getLogger("hotmodel.runtime")

ACTIVE_ALIAS = "active"


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
        self.active_model: str | None = None
        self.started_at = time.monotonic()
        self.http: httpx.AsyncClient | None = None
        self.router: RouterClient | None = None
        self.supervisor: RouterSupervisor | None = None

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
            await self.supervisor.start()
            model = cfg.router.default_model
            log.info("loading default model %r", model)
            t0 = time.monotonic()
            await self.router.load(model)
            await self.router.wait_loaded(
                model, cfg.switch.load_timeout_seconds, log_tail=self.supervisor.log_tail
            )
            log.info("model %r loaded in %.0f ms", model, (time.monotonic() - t0) * 1000)
            self.active_model = model
            if self.state is ServiceState.STARTING:
                self.state = ServiceState.READY
        except BaseException:
            await self.close()
            raise

    def _router_exited(self, code: int) -> None:
        self.state = ServiceState.ROUTER_EXITED

    async def close(self) -> None:
        self.state = ServiceState.STOPPING
        try:
            if self.supervisor is not None:
                await self.supervisor.stop()
        finally:
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
            raise RouterUnavailableError("no model is active yet")
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
            f"switch to it first, or send model 'active'",
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
