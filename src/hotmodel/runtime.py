"""The runtime: what ``hotmodel serve`` owns while it runs, composed as one async exit stack.

:meth:`Runtime.start` enters each resource in order (HTTP client, session
store, router process, model event feed, control loop) on one
``AsyncExitStack`` and loads the default model through the control loop;
:meth:`Runtime.close` leaves them in reverse order, every error collected, and
awaits every task it cancels. ``start()`` either returns :class:`Services`
with the router healthy and the default model ``loaded``, or raises with
nothing left running, even when cancelled half-way (a Ctrl-C during start-up).
The HTTP layer only ever sees a started :class:`Services`: nothing in it is
optional. Starting twice is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from hotmodel.cluster.join import join
from hotmodel.cluster.node import ClusterNode
from hotmodel.config import Config
from hotmodel.control.commands import Snapshot, Switch, SyncResidents
from hotmodel.control.controller import Controller
from hotmodel.control.engine import Engine
from hotmodel.control.feed import Feed
from hotmodel.control.fit import need_beside_residents
from hotmodel.control.gpu import GpuProbe, NoGpu, detect_probe
from hotmodel.control.idle import IdleUnloader
from hotmodel.control.residents import Residents
from hotmodel.control.scheduler import Rules, Scheduler
from hotmodel.control.snapshots import Snapshots
from hotmodel.control.traffic import TrafficGate
from hotmodel.control.upstream import UpstreamSlots
from hotmodel.control.watchdog import Watchdog
from hotmodel.errors import HotModelError, ModelLoadError
from hotmodel.presets import check_model_file
from hotmodel.private import make_private, private_umask
from hotmodel.router.chat_http import ChatHttp
from hotmodel.router.client import RouterClient
from hotmodel.router.events import ModelEvent, ModelEvents
from hotmodel.router.lifecycle import ModelLifecycle
from hotmodel.router.options import check_preset_keys, devices, known_options
from hotmodel.router.provision import find_llama_server
from hotmodel.router.supervisor import RouterSupervisor, free_port
from hotmodel.sessions.retention import Retention
from hotmodel.sessions.service import SessionRef, SessionService
from hotmodel.sessions.store import SessionStore, open_store

log = logging.getLogger("hotmodel.runtime")

# At close, how long requests that are still unwinding get to return their tickets.
CLOSE_DRAIN_S = 5.0


class ServiceState(enum.Enum):
    """hotmodel's own lifecycle (the router's health is the supervisor's and the watchdog's)."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(slots=True)
class Services:
    """Everything a started runtime offers the HTTP layer; nothing here is ever None.

    Only ``config`` ever changes: a reload swaps in the new one (control/reload.py).
    """

    config: Config
    router: RouterClient
    supervisor: RouterSupervisor
    events: ModelEvents
    controller: Controller
    gate: TrafficGate
    sessions: SessionService
    store: SessionStore
    gpu: GpuProbe
    watchdog: Watchdog
    idle: IdleUnloader
    snapshots: Snapshots | None  # None: [switch] kv_snapshots is off
    feed: Feed  # the dashboard's live events (GET /admin/events)
    scheduler: Scheduler  # per-model queues: when to switch, for whom
    # what goes upstream at once, per model (its slots + 1)
    upstream: UpstreamSlots = field(default_factory=UpstreamSlots)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one reload at a time
    cluster: ClusterNode | None = None  # None: no [cluster], a node of its own


class Runtime:
    """Owns the router process, the HTTP client, the store and the control loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = ServiceState.NEW
        self.started_at = time.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self._services: Services | None = None
        self._supervisor: RouterSupervisor | None = None  # as soon as it exists: kill_router()
        # what llama-server demands of every request, made anew at each start, never logged:
        # no other local process can reach the router or a model past hotmodel's keys
        self.backend_key = secrets.token_urlsafe(32)

    @property
    def current_config(self) -> Config:
        """The config in effect: a reload replaces the one the runtime started with."""
        return self.config if self._services is None else self._services.config

    @property
    def services(self) -> Services:
        if self._services is None:
            raise RuntimeError("the runtime is not started")  # a bug: start() comes first
        return self._services

    async def __aenter__(self) -> Services:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> Services:
        if self.state is not ServiceState.NEW:
            raise RuntimeError(f"a runtime starts once (it is {self.state.value})")
        self.state = ServiceState.STARTING
        self.started_at = time.monotonic()
        try:
            self._services = await self._enter(self._stack)
            await self._load_default()
        except BaseException:
            await self.close()
            raise
        if self.state is ServiceState.STARTING:
            self.state = ServiceState.READY
        return self._services

    async def _enter(self, stack: contextlib.AsyncExitStack) -> Services:
        """Enter every resource on ``stack``, in dependency order."""
        cfg = self.config
        check_model_file(cfg.presets, cfg.router.default_model)
        binary = find_llama_server(cfg.router.llama_server)
        check_preset_keys(cfg.presets, await asyncio.to_thread(known_options, binary))
        if cfg.keys.client and not cfg.keys.admin:
            log.warning(
                "[security] sets client keys and no admin key: /admin/* (and the dashboard) "
                "refuse every request until admin_keys is set and hotmodel restarts"
            )
        private_umask()  # from here on, every state file is the user's alone
        store_file = cfg.session_store_file
        own = [
            cfg.router_log_file,
            store_file,
            *(store_file.with_name(store_file.name + x) for x in ("-wal", "-shm")),
        ]
        await asyncio.to_thread(make_private, cfg.server.state_dir, own)
        port = cfg.router.port or free_port(cfg.router.host)
        auth = {"Authorization": f"Bearer {self.backend_key}"}  # llama-server answers only us
        http = await stack.enter_async_context(_http_client(cfg, auth))
        chat_http = await stack.enter_async_context(
            ChatHttp(cfg.server.request_timeout_seconds, auth)
        )
        router = RouterClient(
            http,
            f"http://{_url_host(cfg.router.host)}:{port}",
            cfg.server.request_timeout_seconds,
            direct=cfg.router.direct,
            chat_http=chat_http,
        )
        store = await stack.enter_async_context(open_store(cfg))
        sessions = SessionService(cfg, store, router)
        gpu = await asyncio.to_thread(detect_probe, cfg.switch.gpu_probe)
        baseline = await asyncio.to_thread(gpu.read)  # before any model is loaded
        # a CPU-only llama-server has no device memory to wait for: a leaving model's
        # process may exit while the next one loads (docs/architecture.md)
        cpu_only = isinstance(gpu, NoGpu) and await asyncio.to_thread(devices, binary) == ()
        supervisor = RouterSupervisor(
            cfg, binary, router, port, spare=cpu_only, api_key=self.backend_key
        )
        self._supervisor = supervisor
        # a router an earlier hotmodel left behind (kill -9) goes before ours starts
        await asyncio.to_thread(supervisor.pid_file.reap_stale, cfg.router.stop_timeout_seconds)
        await supervisor.start()
        stack.push_async_callback(supervisor.stop)
        events = ModelEvents(router)
        await stack.enter_async_context(_task(events.run(), "model-events"))
        lifecycle = ModelLifecycle(router, events, supervisor.log_tail)
        stack.push_async_callback(lifecycle.aclose)
        gate = TrafficGate()
        residents = Residents(
            lifecycle,
            cfg.presets.residents,
            preflight=lambda name: check_model_file(self.current_config.presets, name),
            current=supervisor.runs_preset,
            generation=lambda: supervisor.restarts,
        )
        snapshots = None
        if cfg.switch.kv_snapshots:
            snapshots = Snapshots(cfg, binary, router, sessions, sessions.slots)
            await asyncio.to_thread(snapshots.prune)  # models whose file changed, leftovers
        engine = Engine(
            config=cfg.switch,
            drain_timeout=cfg.server.switch_drain_timeout_seconds,
            lifecycle=lifecycle,
            gate=gate,
            gpu=gpu,
            log_tail=supervisor.log_tail,
            replayer=sessions.replay,
            baseline_mib=None if baseline is None else baseline.used_mib,
            process=supervisor,
            preflight=lambda target: check_model_file(self.current_config.presets, target),
            kv=snapshots,
            # the target's, and the residents' that are not loaded now (a loaded one is
            # in the GPU's reading already)
            estimate=lambda target: need_beside_residents(
                self.current_config.presets,
                target,
                self.current_config.router,
                residents.unloaded(),
            ),
            models_max=cfg.router.models_max,
            exit_in_background=cpu_only,
        )
        feed = Feed()  # every phase, report and model event, for the dashboard
        controller = Controller(engine, cfg.presets.models, residents)
        controller.watch(feed.watch)
        events.listeners.append(feed.model_event)
        events.listeners.append(_progress_to(controller))
        await stack.enter_async_context(_task(controller.run(), "control-loop"))
        stack.callback(controller.close)  # on the way out: first refuse new commands
        if snapshots is not None:  # ... but before that, keep the conversation's KV
            stack.push_async_callback(self._save_on_close, controller)
        watchdog = Watchdog(cfg, supervisor, router, controller)
        supervisor.on_exit, events.on_event = watchdog.router_exited, watchdog.model_event
        await stack.enter_async_context(_task(watchdog.run(), "watchdog"))
        idle = IdleUnloader(lambda: self.current_config.router, gate, controller)
        await stack.enter_async_context(_task(idle.run(), "idle-unload"))
        scheduler = Scheduler(
            controller,
            gate,
            lambda: _rules(self.current_config),
            lambda: self.current_config.switch.max_queue,
            slots=lambda model: _slots(self.current_config, model),
            priority=lambda model: _preset_priority(self.current_config, model),
            snapshot=_snapshot_query(snapshots),
        )
        controller.watch(scheduler.poke)  # an admin's switch may serve a queue
        await stack.enter_async_context(_task(scheduler.run(), "scheduler"))
        # in a cluster: the registry, its heartbeat, placement (None: a node of its own)
        cluster = await join(
            stack, lambda: self.current_config, controller, gate, scheduler, gpu, _task, snapshots
        )
        await sessions.warn_missing_prompts()  # a stored session's prompt gone from the config
        retention = Retention(lambda: self.current_config.session, sessions, snapshots)
        await stack.enter_async_context(_task(retention.run(), "session-retention"))
        return Services(
            config=cfg,
            router=router,
            supervisor=supervisor,
            events=events,
            controller=controller,
            gate=gate,
            sessions=sessions,
            store=store,
            gpu=gpu,
            watchdog=watchdog,
            idle=idle,
            scheduler=scheduler,
            upstream=UpstreamSlots(lambda model: _slots(self.current_config, model)),
            snapshots=snapshots,
            feed=feed,
            cluster=cluster,
        )

    async def _load_default(self) -> None:
        """The first load is a command like any other: the control loop does it.
        Without preload the model is parked: the first request loads it. The residents
        are loaded first, by a command of their own: one that fails is logged and shown
        (``/admin/status``), and hotmodel starts all the same."""
        model = self.config.router.default_model
        if self.config.presets.residents:
            self.services.controller.post(SyncResidents())
        if not self.config.router.preload:
            self.services.controller.park(model)
            log.info("default model %r is loaded by the first request ([router] preload)", model)
            return
        log.info("loading default model %r", model)
        report = await self.services.controller.submit(Switch(model, replay_session=False))
        if report.failed:
            raise ModelLoadError(
                report.error or f"model {model!r} failed to load", report.log_tail or ""
            )
        log.info("model %r loaded in %.0f ms", model, report.total_ms)

    async def close(self) -> None:
        """Leave every resource in reverse order (idempotent)."""
        if self.state in (ServiceState.STOPPING, ServiceState.STOPPED):
            return
        self.state = ServiceState.STOPPING
        try:
            if self._services is not None:
                # Requests the server cancelled unwind on their own; let them return their
                # tickets (and finish a store write) before the store and client close.
                await self._services.gate.drain(None, CLOSE_DRAIN_S)
            await self._stack.aclose()
        finally:
            self.state = ServiceState.STOPPED

    async def _save_on_close(self, controller: Controller) -> None:
        """At stop, the active model's KV goes to disk, so the next start finds it."""
        if self._supervisor is None or not self._supervisor.running:
            return
        try:
            async with asyncio.timeout(self.config.switch.load_timeout_seconds):
                report = await controller.submit(Snapshot())
            saved = report.snapshot.get("save")
            if saved and saved.get("saved", True):
                log.info("kept the KV of session %r (%s bytes)", saved["session"], saved["bytes"])
            elif saved:
                log.info("KV not kept at stop: %s", saved.get("reason"))
        except (TimeoutError, HotModelError) as exc:
            log.warning("could not keep the KV snapshot at stop: %s", exc)

    def kill_router(self) -> None:
        """A forced exit: kill the router tree now, without waiting for anything
        (during start-up too: the supervisor is known from the moment it exists)."""
        if self._supervisor is not None:
            self._supervisor.kill(forced_exit=True)

    def uptime(self) -> float:
        return time.monotonic() - self.started_at


def _rules(config: Config) -> Rules:
    s = config.switch
    return Rules(s.max_wait_seconds, s.linger_seconds, s.min_resident_seconds, s.aging_seconds)


def _slots(config: Config, model: str) -> int:
    """Requests ``model`` serves at once: its preset's np, else ``[router] parallel``."""
    return config.presets.slots(model, config.router.parallel)


def _preset_priority(config: Config, model: str) -> int:
    preset = config.presets.models.get(model)
    return 0 if preset is None else preset.priority


def _snapshot_query(snapshots: Snapshots | None) -> Callable[[str, SessionRef], bool]:
    """Whether a session has a KV snapshot for a model (the scheduler weighs it)."""
    if snapshots is None:
        return lambda model, session: False
    return lambda model, session: snapshots.has(model, session.owner, session.id)


def _http_client(cfg: Config, headers: Mapping[str, str]) -> httpx.AsyncClient:
    """One pooled client for every call to the router; no overall timeout because
    generations may stream for minutes (per-call timeouts apply)."""
    return httpx.AsyncClient(
        headers=headers,
        timeout=httpx.Timeout(cfg.server.request_timeout_seconds, connect=5.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        trust_env=False,
    )


@contextlib.asynccontextmanager
async def _task(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro`` as a task for the block; cancelled and awaited when it ends."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _progress_to(controller: Controller) -> Callable[[ModelEvent], None]:
    """The router's load progress, as progress events of the running LOAD step."""

    def listener(event: ModelEvent) -> None:
        if event.progress is not None:
            controller.load_progress(event.model, event.progress, event.stage)

    return listener


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
