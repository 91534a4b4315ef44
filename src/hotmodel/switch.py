"""The switch engine: the one owner of the active model and of the switch state.

A switch is a plan (:func:`plan`, pure) executed step by step through
injected interfaces: the router (:class:`RouterOps`), the GPU probe, the
traffic gate and an optional replay hook. Unit tests drive it with recording
fakes; end-to-end tests drive it against the real router.

zero_overlap (default; one model resident at a time)::

    IDLE ─▶ DRAINING ─▶ UNLOADING ─▶ SETTLING ─▶ LOADING ─▶ REPLAYING ─▶ IDLE
             ≤ drain      ≤ unload     ≤ settle     ≤ load
             timeout      timeout      timeout      timeout
               │            │                         │
               │ fail       └──────── failure ────────┴─▶ ROLLING_BACK ─▶ IDLE (previous model back)
               ▼                                                     └──▶ FAILED (no model loaded)
             IDLE (nothing changed; the gate reopens)

overlap (``models_max >= 2``): LOADING ─▶ REPLAYING ─▶ (activate) ─▶ DRAINING
the old model's requests ─▶ UNLOADING it ─▶ IDLE. New requests go to the target
as soon as it is active; the gate never closes.

Switches are serialized by one lock; a request for a target that is already
queued or running joins that switch instead of starting another.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from hotmodel.config import SwitchConfig
from hotmodel.errors import HotModelError, ModelLoadError, ModelNotFoundError
from hotmodel.gpu import GpuProbe, GpuSnapshot, NoGpu, settled
from hotmodel.router_client import ModelStatus
from hotmodel.traffic import TrafficGate

log = logging.getLogger("hotmodel.switch")

# How long cancelled requests get to wind down before the unload goes ahead.
CANCEL_GRACE_S = 5.0
SETTLE_POLL_S = 0.1


class SwitchState(enum.Enum):
    IDLE = "idle"
    DRAINING = "draining"
    UNLOADING = "unloading"
    SETTLING = "settling"
    LOADING = "loading"
    REPLAYING = "replaying"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"  # no model is loaded: the last switch and its rollback failed


class Step(enum.Enum):
    DRAIN = "drain"
    UNLOAD = "unload"
    SETTLE = "settle"
    LOAD = "load"
    REPLAY = "replay"
    ACTIVATE = "activate"


_STEP_STATE = {
    Step.DRAIN: SwitchState.DRAINING,
    Step.UNLOAD: SwitchState.UNLOADING,
    Step.SETTLE: SwitchState.SETTLING,
    Step.LOAD: SwitchState.LOADING,
    Step.REPLAY: SwitchState.REPLAYING,
}


def plan(policy: str, current: str | None, target: str) -> tuple[Step, ...]:
    """The steps that take the router from ``current`` to ``target``."""
    if current is None:
        return (Step.LOAD, Step.REPLAY, Step.ACTIVATE)
    if policy == "overlap":
        return (Step.LOAD, Step.REPLAY, Step.ACTIVATE, Step.DRAIN, Step.UNLOAD)
    return (Step.DRAIN, Step.UNLOAD, Step.SETTLE, Step.LOAD, Step.REPLAY, Step.ACTIVATE)


class RouterOps(Protocol):
    """What the engine needs from the router (``RouterClient`` provides it)."""

    async def load_and_wait(
        self, model: str, timeout: float, log_tail: Callable[[], str] = ...
    ) -> ModelStatus: ...
    async def unload_and_wait(self, model: str, timeout: float) -> ModelStatus: ...
    async def models(self) -> dict[str, ModelStatus]: ...


Replayer = Callable[[str], Awaitable[dict[str, Any] | None]]


@dataclass
class SwitchReport:
    """What one switch did; returned to the caller and kept in the history."""

    id: int
    from_model: str | None
    to_model: str
    policy: str
    started_at: str
    outcome: str = "running"  # ok | failed | already_active
    error: str | None = None
    rolled_back: bool = False
    active_after: str | None = None
    total_ms: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    gpu: dict[str, dict[str, Any] | None] = field(
        default_factory=lambda: {
            "before_unload": None,
            "after_unload": None,
            "after_settle": None,
            "after_load": None,
        }
    )
    drained: int = 0
    cancelled: int = 0
    replay: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    log_tail: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("from_model")
        data["to"] = data.pop("to_model")
        return data


@dataclass(frozen=True, slots=True)
class SwitchEvent:
    """Progress of a switch: a step started, ended, failed or was skipped."""

    switch_id: int
    phase: str
    status: str  # started | done | failed | skipped
    ms: float | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Listener = Callable[[SwitchEvent], None]


class _StepFailedError(Exception):
    def __init__(self, step: Step, message: str, log_tail: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.log_tail = log_tail


class SwitchEngine:
    """Owns the active model and the switch state; runs one switch at a time."""

    def __init__(
        self,
        *,
        config: SwitchConfig,
        drain_timeout: float,
        router: RouterOps,
        gate: TrafficGate,
        presets: Collection[str],
        active: str | None,
        gpu: GpuProbe | None = None,
        log_tail: Callable[[], str] = lambda: "",
        replay: Replayer | None = None,
        baseline_mib: int | None = None,
    ) -> None:
        self.config = config
        self.drain_timeout = drain_timeout
        self.router = router
        self.gate = gate
        self.presets = frozenset(presets)
        self.active = active
        self.gpu: GpuProbe = gpu or NoGpu()
        self.log_tail = log_tail
        self.replay = replay
        self.baseline_mib = baseline_mib
        self.state = SwitchState.IDLE if active is not None else SwitchState.FAILED
        self.history: deque[SwitchReport] = deque(maxlen=config.history)
        self.current: SwitchReport | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[asyncio.Future[SwitchReport], list[Listener]]] = {}

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def check_target(self, target: str) -> None:
        """Raise :class:`ModelNotFoundError` unless ``target`` is a preset."""
        if target not in self.presets:
            known = ", ".join(sorted(self.presets))
            raise ModelNotFoundError(
                f"model {target!r} is not a preset (known: {known})", param="model"
            )

    async def switch(self, target: str, listener: Listener | None = None) -> SwitchReport:
        """Switch to ``target``; returns the report (its ``outcome`` says whether it worked)."""
        self.check_target(target)
        if target in self._pending:  # queued or running: join it
            fut, listeners = self._pending[target]
            if listener is not None:
                listeners.append(listener)
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        listeners = [listener] if listener is not None else []
        self._pending[target] = (fut, listeners)
        try:
            async with self._lock:
                report = await self._run(target, listeners)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: joined callers re-raise it themselves
            raise
        finally:
            del self._pending[target]
        fut.set_result(report)
        return report

    async def _run(self, target: str, listeners: list[Listener]) -> SwitchReport:
        report = SwitchReport(
            id=next(self._ids),
            from_model=self.active,
            to_model=target,
            policy=self.config.policy,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        self.current = report
        t0 = time.monotonic()
        previous = self.active
        try:
            if target == previous:
                report.outcome = "already_active"
                return report
            activated = False
            for step in plan(self.config.policy, previous, target):
                try:
                    await self._timed(step, report, listeners, previous, target)
                except _StepFailedError as failure:
                    if not activated:
                        raise
                    # overlap: the target already serves; the old model stays resident
                    report.warnings.append(str(failure))
                    self._emit(
                        listeners,
                        SwitchEvent(report.id, failure.step.value, "failed", detail=str(failure)),
                    )
                    break
                activated = activated or step is Step.ACTIVATE
            report.outcome = "ok"
        except _StepFailedError as failure:
            report.outcome = "failed"
            report.error = str(failure)
            report.log_tail = failure.log_tail
            self._emit(
                listeners, SwitchEvent(report.id, failure.step.value, "failed", detail=str(failure))
            )
            if failure.step is not Step.DRAIN:
                await self._recover(report, listeners, previous, target)
        finally:
            self.gate.open()
            report.active_after = self.active
            report.total_ms = _ms(t0)
            self.state = SwitchState.IDLE if self.active is not None else SwitchState.FAILED
            self.current = None
            self.history.append(report)
            log.info(
                "switch %s %s -> %s: %s in %.0f ms%s",
                report.id,
                report.from_model,
                target,
                report.outcome,
                report.total_ms,
                f" ({report.error})" if report.error else "",
            )
        return report

    async def _timed(
        self,
        step: Step,
        report: SwitchReport,
        listeners: list[Listener],
        previous: str | None,
        target: str,
    ) -> None:
        if step in _STEP_STATE:
            self.state = _STEP_STATE[step]
        self._emit(listeners, SwitchEvent(report.id, step.value, "started"))
        t = time.monotonic()
        detail = await self._do(step, report, previous, target)
        ms = _ms(t)
        if detail == "skipped":
            self._emit(listeners, SwitchEvent(report.id, step.value, "skipped"))
            return
        if step is not Step.ACTIVATE:
            report.phases[step.value] = ms
        self._emit(listeners, SwitchEvent(report.id, step.value, "done", ms, detail))

    async def _do(
        self, step: Step, report: SwitchReport, previous: str | None, target: str
    ) -> str | None:
        if step is Step.DRAIN:
            assert previous is not None  # plan() drains only when a model is active
            return await self._drain(report, previous)
        if step is Step.UNLOAD:
            assert previous is not None
            return await self._unload(report, previous)
        if step is Step.SETTLE:
            return await self._settle(report)
        if step is Step.LOAD:
            return await self._load(report, target)
        if step is Step.REPLAY:
            return await self._replay(report, target)
        self.active = target
        return None

    async def _drain(self, report: SwitchReport, model: str) -> str | None:
        models = {model}
        if self.config.policy == "zero_overlap":
            self.gate.close()  # from here on, new requests wait for the switch
        report.drained = len(self.gate.inflight(models))
        if await self.gate.drain(models, self.drain_timeout):
            return f"{report.drained} request(s) finished" if report.drained else None
        still = len(self.gate.inflight(models))
        if self.config.drain_timeout_action == "fail":
            raise _StepFailedError(
                Step.DRAIN,
                f"{still} generation(s) on {model!r} still running after "
                f"{self.drain_timeout:g}s ([server] switch_drain_timeout_seconds); "
                "nothing was changed",
            )
        report.cancelled = self.gate.cancel(
            models, f"cancelled: switching {model!r} -> {report.to_model!r}"
        )
        if not await self.gate.drain(models, CANCEL_GRACE_S):
            raise _StepFailedError(
                Step.DRAIN,
                f"{still} cancelled generation(s) on {model!r} "
                f"did not end within {CANCEL_GRACE_S:g}s",
            )
        return f"cancelled {report.cancelled} request(s) after {self.drain_timeout:g}s"

    async def _unload(self, report: SwitchReport, model: str) -> str | None:
        if report.gpu["before_unload"] is None:
            report.gpu["before_unload"] = await self._snapshot()
        try:
            status = (await self.router.models()).get(model)
            if status is None or status.value in ("unloaded",):
                detail = f"{model!r} was not loaded"
            else:
                await self.router.unload_and_wait(model, self.config.unload_timeout_seconds)
                detail = None
        except HotModelError as exc:
            raise _StepFailedError(Step.UNLOAD, f"unloading {model!r} failed: {exc}") from exc
        report.gpu["after_unload"] = await self._snapshot()
        return detail

    async def _settle(self, report: SwitchReport) -> str | None:
        after_unload = report.gpu["after_unload"]
        if (
            isinstance(self.gpu, NoGpu)
            or self.config.settle_timeout_seconds <= 0
            or after_unload is None
        ):
            return "skipped"
        before = report.gpu["before_unload"]
        readings = [int(after_unload["used_mib"])]
        snap_json: dict[str, Any] | None = after_unload
        deadline = time.monotonic() + self.config.settle_timeout_seconds
        result = None
        while not settled(
            readings,
            None if before is None else int(before["used_mib"]),
            self.baseline_mib,
            self.config.settle_tolerance_mib,
        ):
            if time.monotonic() >= deadline:
                result = (
                    f"memory still at {readings[-1]} MiB after "
                    f"{self.config.settle_timeout_seconds:g}s; going on"
                )
                break
            await asyncio.sleep(SETTLE_POLL_S)
            snap = await self._snapshot()
            if snap is None:
                break
            snap_json = snap
            readings.append(int(snap["used_mib"]))
        report.gpu["after_settle"] = snap_json
        return result

    async def _load(self, report: SwitchReport, target: str) -> str | None:
        try:
            await self.router.load_and_wait(
                target, self.config.load_timeout_seconds, log_tail=self.log_tail
            )
        except HotModelError as exc:
            tail = (exc.log_tail if isinstance(exc, ModelLoadError) else "") or self.log_tail()
            raise _StepFailedError(Step.LOAD, _summary(exc), tail or None) from exc
        report.gpu["after_load"] = await self._snapshot()
        return None

    async def _replay(self, report: SwitchReport, target: str) -> str | None:
        if self.replay is None or not self.config.replay:
            return "skipped"
        try:
            report.replay = await self.replay(target)
        except HotModelError as exc:  # a failed prefill costs speed, not correctness
            report.warnings.append(f"replay failed: {exc}")
            return f"replay failed: {exc}"
        if report.replay is None:
            return "skipped"  # no session to replay
        ms = report.replay.get("prompt_ms")
        ms_text = f"{ms:.1f}" if isinstance(ms, int | float) else "?"
        return f"{report.replay.get('prompt_tokens')} prompt tokens in {ms_text} ms"

    async def _recover(
        self, report: SwitchReport, listeners: list[Listener], previous: str | None, target: str
    ) -> None:
        """After a failed unload/load: make sure the target is not resident, then
        bring ``previous`` back (it may still be loaded, e.g. under overlap)."""
        self.state = SwitchState.ROLLING_BACK
        self._emit(listeners, SwitchEvent(report.id, "rollback", "started"))
        t = time.monotonic()
        try:
            statuses = await self.router.models()
            t_status = statuses.get(target)
            if t_status is not None and t_status.value in ("loading", "loaded", "sleeping"):
                await self.router.unload_and_wait(target, self.config.unload_timeout_seconds)
            if previous is None:
                self.active = None
            elif (p_status := statuses.get(previous)) is not None and p_status.value == "loaded":
                self.active = previous  # never left (overlap, or the unload did not happen)
            else:
                await self.router.load_and_wait(
                    previous, self.config.load_timeout_seconds, log_tail=self.log_tail
                )
                self.active = previous
                report.rolled_back = True
            status, detail = "done", f"active: {self.active!r}"
        except HotModelError as exc:
            self.active = None
            report.error = f"{report.error}; rollback to {previous!r} failed: {_summary(exc)}"
            status, detail = "failed", _summary(exc)
        report.phases["rollback"] = _ms(t)
        self._emit(
            listeners, SwitchEvent(report.id, "rollback", status, report.phases["rollback"], detail)
        )

    async def _snapshot(self) -> dict[str, Any] | None:
        if isinstance(self.gpu, NoGpu):
            return None
        snap: GpuSnapshot | None = await asyncio.to_thread(self.gpu.snapshot)
        return None if snap is None else snap.to_json()

    def _emit(self, listeners: list[Listener], event: SwitchEvent) -> None:
        for listener in list(listeners):
            with contextlib.suppress(Exception):  # a broken listener must not break a switch
                listener(event)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "active": self.active,
            "current": None if self.current is None else self.current.to_json(),
        }


def _summary(exc: HotModelError) -> str:
    """An error without the router log tail that a load failure carries."""
    return exc.summary if isinstance(exc, ModelLoadError) else str(exc)


def _ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)
