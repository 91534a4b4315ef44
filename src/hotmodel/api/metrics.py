"""Prometheus metrics: what requests and switches did, and the state at scrape time.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (never the
global one: a test process creates several apps). Request metrics are
counted once per request by the :class:`~hotmodel.api.observe.Observe`
middleware from its :class:`~hotmodel.api.record.RequestRecord`; switch
metrics come from the engine's ``watchers`` (every phase event and every
finished report); gauges (active model, GPU memory, sessions, in-flight
requests, router restarts...) are read when ``GET /metrics`` is scraped, by
:class:`StateCollector`, so nothing is kept up to date between scrapes.
docs/operations.md lists every metric.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hotmodel import __version__
from hotmodel.api.record import RequestRecord
from hotmodel.control.gpu import GpuProbe, GpuReading
from hotmodel.control.report import PhaseStatus, SwitchEvent, SwitchReport, SwitchState
from hotmodel.errors import HotModelError
from hotmodel.router.supervisor import RouterState
from hotmodel.runtime import Runtime

log = logging.getLogger("hotmodel.metrics")

# A whole request: from a health probe (ms) to a long generation (minutes).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# hotmodel's own share: sub-millisecond when nothing waits; seconds behind a switch.
OVERHEAD_BUCKETS: tuple[float, ...] = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05),
    *(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SWITCH_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
# A method outside these is counted as "other" (a client can send any token).
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
# Feeds a client keeps open for as long as it watches: counted, but their length is
# how long someone looked at the dashboard, which would swamp the duration histogram.
OPEN_ENDED_ROUTES = frozenset({"/admin/events"})
# How long a scrape waits for a GPU reading (nvidia-smi may take seconds); the read
# goes on in its thread and the scrape shows the previous one.
GPU_READ_TIMEOUT_S = 2.0
MIB = 1 << 20


class Metrics:
    """The app's registry and the metrics hotmodel counts as things happen."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "hotmodel_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "hotmodel_request_duration_seconds",
            "Whole request time in hotmodel, first byte in to last byte out",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "hotmodel_upstream_duration_seconds",
            "Chat requests: from sending to llama-server to its last byte",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.overhead_seconds = Histogram(
            "hotmodel_request_overhead_seconds",
            "Chat requests: time in hotmodel itself (whole request minus upstream)",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "hotmodel_time_to_first_token_seconds",
            "Streamed chat: from the request's arrival to the first generated text relayed",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "hotmodel_prompt_tokens", "Prompt tokens of answered requests", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "hotmodel_completion_tokens",
            "Generated tokens of answered requests",
            ["model"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "hotmodel_prompt_cached_tokens",
            "Prompt tokens served from llama-server's prompt cache (timings.cache_n)",
            ["model"],
            registry=r,
        )
        self._switch_metrics(r)
        self.state: StateCollector | None = None
        # label children, looked up once per label set (the sets are bounded: see observe.py)
        self._by_request: dict[tuple[str, str, int], tuple[Counter, Histogram | None]] = {}
        self._by_model: dict[str, tuple[Histogram, Counter, Counter, Counter]] = {}

    def attach(self, runtime: Runtime) -> None:
        """Read ``runtime``'s state at each scrape and count its engine's commands."""
        self.state = StateCollector(runtime)
        self.registry.register(self.state)
        controller = runtime.services.controller
        for report in controller.history:  # the first load happened before this app existed
            self._count_report(report, phases=True)
        controller.watch(self.watch)

    def _switch_metrics(self, r: CollectorRegistry) -> None:
        self.switches = Counter(
            "hotmodel_switches",
            "Commands of the control loop (switches, recoveries, unloads) by outcome and policy",
            ["outcome", "policy"],
            registry=r,
        )
        self.switch_seconds = Histogram(
            "hotmodel_switch_duration_seconds",
            "Whole command duration, by outcome",
            ["outcome"],
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.phase_seconds = Histogram(
            "hotmodel_switch_phase_duration_seconds",
            "Duration of each completed phase of a switch",
            ["phase"],
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.phases = Counter(
            "hotmodel_switch_phases",
            "Switch phases ended, by phase and status (done, failed, skipped)",
            ["phase", "status"],
            registry=r,
        )
        self.rollbacks = Counter(
            "hotmodel_switch_rollbacks", "Switches that failed and rolled back", registry=r
        )

    def request_done(self, record: RequestRecord, now: float) -> None:
        """Count one finished request (called once, by the middleware)."""
        total = now - record.started
        method = record.method if record.method in METHODS else "other"
        key = (record.route, method, record.status or 499)
        children = self._by_request.get(key)
        if children is None:  # labels() takes a lock and builds a key: once per label set
            children = self._by_request[key] = (
                self.requests.labels(key[0], method, str(key[2])),
                None if key[0] in OPEN_ENDED_ROUTES else self.request_seconds.labels(key[0]),
            )
        children[0].inc()
        if children[1] is not None:
            children[1].observe(total)
        upstream = record.upstream_seconds(now)
        if upstream is None:
            return
        self.upstream_seconds.observe(upstream)
        self.overhead_seconds.observe(max(0.0, total - upstream))
        model = record.model or ""
        per_model = self._by_model.get(model)
        if per_model is None:
            per_model = self._by_model[model] = (
                self.ttft_seconds.labels(model),
                self.prompt_tokens.labels(model),
                self.completion_tokens.labels(model),
                self.cached_tokens.labels(model),
            )
        ttft, prompt, completion, cached = per_model
        if record.first_token is not None:
            ttft.observe(record.first_token - record.started)
        if record.usage is not None:
            prompt.inc(record.usage.prompt)
            completion.inc(record.usage.completion)
            cached.inc(record.usage.cached)

    def watch(self, seen: SwitchEvent | SwitchReport) -> None:
        """An engine watcher: every phase event, and every report when its command ends."""
        if isinstance(seen, SwitchReport):
            self._count_report(seen, phases=False)
        elif seen.status not in (PhaseStatus.STARTED, PhaseStatus.PROGRESS):
            # phases that ended; a load's progress events are not phases
            self.phases.labels(seen.phase, seen.status.value).inc()
            if seen.status is PhaseStatus.DONE and seen.ms is not None:
                self.phase_seconds.labels(seen.phase).observe(seen.ms / 1000)

    def _count_report(self, report: SwitchReport, phases: bool) -> None:
        outcome = report.outcome.value
        self.switches.labels(outcome, report.policy).inc()
        self.switch_seconds.labels(outcome).observe(report.total_ms / 1000)
        if report.rolled_back:
            self.rollbacks.inc()
        if phases:  # from a report kept before the watcher existed: its completed phases
            for phase, ms in report.phases.items():
                self.phases.labels(phase, PhaseStatus.DONE.value).inc()
                self.phase_seconds.labels(phase).observe(ms / 1000)

    async def render(self) -> bytes:
        """The text exposition, with the scrape-time readings refreshed first."""
        if self.state is not None:
            await self.state.refresh()
        return generate_latest(self.registry)


class GpuReader:
    """GPU memory for a scrape: read in a thread, one read at a time, bounded wait."""

    def __init__(self, probe: GpuProbe) -> None:
        self.probe = probe
        self.last: GpuReading | None = None
        self._pending: asyncio.Future[GpuReading | None] | None = None

    async def read(self) -> GpuReading | None:
        if self.probe.name == "none":
            return None
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(asyncio.to_thread(self.probe.read))
            # a read that outlives its scrape still has its outcome retrieved
            self._pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            self.last = await asyncio.wait_for(asyncio.shield(self._pending), GPU_READ_TIMEOUT_S)
        except TimeoutError:
            log.debug("GPU read slower than %ss: showing the previous one", GPU_READ_TIMEOUT_S)
        except Exception as exc:  # a probe must not fail a scrape
            log.warning("GPU read failed: %r", exc)
        return self.last


class StateCollector(Collector):
    """Gauges (and counters kept by others) read at scrape time from the runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.gpu = GpuReader(runtime.services.gpu)
        self.reading: GpuReading | None = None
        self.sessions: int | None = None
        self.kv: dict[str, int] | None = None

    async def refresh(self) -> None:
        """The readings that need I/O: the store's count, the GPU, the KV folder."""
        s = self.runtime.services
        try:
            self.sessions = await s.store.count()
        except HotModelError as exc:  # a closing store: the scrape still answers
            log.warning("could not count sessions: %s", exc)
        self.reading = await self.gpu.read()
        self.kv = None if s.snapshots is None else await asyncio.to_thread(s.snapshots.stats)

    def collect(self) -> Iterable[Metric]:
        s, runtime = self.runtime.services, self.runtime
        yield _gauge("hotmodel_info", "hotmodel's version", 1, version=__version__)
        yield _gauge("hotmodel_uptime_seconds", "Seconds since hotmodel started", runtime.uptime())
        active = s.controller.active
        models = GaugeMetricFamily(
            "hotmodel_active_model",
            "1 for the preset requests go to now, 0 for the others",
            labels=["model"],
        )
        for name in s.config.presets.models:
            models.add_metric([name], 1 if name == active else 0)
        yield models
        states = GaugeMetricFamily(
            "hotmodel_switch_state", "1 for what the control loop is doing now", labels=["state"]
        )
        for state in SwitchState:
            states.add_metric([state.value], 1 if s.controller.state is state else 0)
        yield states
        yield _gauge(
            "hotmodel_requests_in_flight",
            "Chat requests admitted and not finished",
            len(s.gate.inflight()),
        )
        queued = GaugeMetricFamily(
            "hotmodel_queue_waiting", "Requests waiting for a model to be loaded", labels=["model"]
        )
        oldest = GaugeMetricFamily(
            "hotmodel_queue_oldest_wait_seconds",
            "How long the oldest request waiting for a model has waited",
            labels=["model"],
        )
        for name, queue in s.scheduler.status().items():
            queued.add_metric([name], queue["waiting"])
            oldest.add_metric([name], queue["oldest_wait_s"])
        yield queued
        yield oldest
        if self.sessions is not None:
            yield _gauge("hotmodel_sessions", "Sessions in the store", self.sessions)
        yield _gauge(
            "hotmodel_sessions_busy",
            "Sessions with a request running or waiting for its turn",
            len(s.sessions.locks),
        )
        yield from self._router(runtime)
        yield from gpu_metrics(self.reading)
        if self.kv is not None:
            yield _gauge("hotmodel_kv_snapshots", "KV snapshots kept on disk", self.kv["count"])
            yield _gauge("hotmodel_kv_snapshot_bytes", "Bytes of KV snapshots", self.kv["bytes"])

    def _router(self, runtime: Runtime) -> Iterable[Metric]:
        s = runtime.services
        running = s.supervisor.state is RouterState.RUNNING
        yield _gauge("hotmodel_router_up", "1 while the llama-server router runs", int(running))
        yield CounterMetricFamily(
            "hotmodel_router_restarts",
            "Times the router was restarted after it died or hung",
            value=s.supervisor.restarts,
        )
        yield CounterMetricFamily(
            "hotmodel_watchdog_recoveries",
            "Times the watchdog brought the router or the model back",
            value=s.watchdog.recoveries,
        )


def gpu_metrics(reading: GpuReading | None) -> Iterable[Metric]:
    """GPU memory per device, in bytes; no series at all when no GPU is visible."""
    if reading is None:
        return
    labels = ["gpu", "name"]
    used = GaugeMetricFamily("hotmodel_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
    total = GaugeMetricFamily("hotmodel_gpu_memory_total_bytes", "GPU memory", labels=labels)
    for device in reading.devices:
        used.add_metric([str(device.index), device.name], device.used_mib * MIB)
        total.add_metric([str(device.index), device.name], device.total_mib * MIB)
    yield used
    yield total


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    if not labels:
        return GaugeMetricFamily(name, doc, value=value)
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def metrics_routes(metrics: Metrics) -> list[Route]:
    async def scrape(request: Request) -> Response:
        """Prometheus' text format (admin key needed when keys are set)."""
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", scrape, methods=["GET"])]
