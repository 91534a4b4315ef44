"""The engine: executes one command's steps in order; the owner of the active model.

Only the controller's task calls :meth:`Engine.execute` (see ``controller.py``), so
one command runs at a time and nothing else writes ``active`` or ``state``.
The steps come from the pure :func:`~hotmodel.control.plan.plan`; the router,
the router process, KV snapshots, the GPU probe, the traffic gate and the
replay hook are injected (``ports.py``), so unit tests drive the engine with
recording fakes; what each step does through them is in ``effects.py``. The
state machine with every deadline is drawn in docs/architecture.md ("One
owner: the control loop"). A failure before the target is active rolls back
(CHECK and DRAIN failures changed nothing); after activation it is a warning.
Rollback never reads the router's state to decide: it unloads the target if a
load was attempted and loads the previous model if its unload was attempted;
both operations are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from hotmodel.config import Config, SwitchConfig
from hotmodel.control.commands import EngineCommand, Recover, Snapshot, Switch, Unload
from hotmodel.control.effects import StepEffects
from hotmodel.control.execution import (
    SKIPPED,
    STEP_STATE,
    Detail,
    Execution,
    Skipped,
    StepFailedError,
    ms_since,
    policy_label,
    summary,
)
from hotmodel.control.fit import choose_policy, free_mib
from hotmodel.control.gpu import GpuProbe, NoGpu
from hotmodel.control.plan import Policy, Step, beside_load, plan, plan_recovery
from hotmodel.control.ports import KvOps, LifecycleOps, ProcessOps, Replayer
from hotmodel.control.report import (
    Listener,
    Outcome,
    PhaseStatus,
    SwitchReport,
    SwitchState,
    Watcher,
)
from hotmodel.control.traffic import TrafficGate
from hotmodel.errors import HotModelError

log = logging.getLogger("hotmodel.control")

RESTORED_SKIP = "the restored KV holds the conversation; the next turn proves it"


class Engine(StepEffects):
    """Owns the active model and the switch state; runs what the controller hands it."""

    def __init__(
        self,
        *,
        config: SwitchConfig,
        drain_timeout: float,
        lifecycle: LifecycleOps,
        gate: TrafficGate,
        gpu: GpuProbe | None = None,
        log_tail: Callable[[], str] = lambda: "",
        replayer: Replayer | None = None,
        baseline_mib: int | None = None,
        process: ProcessOps | None = None,
        preflight: Callable[[str], None] | None = None,
        kv: KvOps | None = None,
        estimate: Callable[[str], int | None] | None = None,
        models_max: int = 1,
        exit_in_background: bool = False,
    ) -> None:
        self.config = config
        self.drain_timeout = drain_timeout
        self.lifecycle = lifecycle
        self.gate = gate
        self.gpu: GpuProbe = gpu or NoGpu()
        self.log_tail = log_tail
        self.replayer = replayer
        self.baseline_mib = baseline_mib
        self.process = process
        self.preflight = preflight
        self.kv = kv
        self.estimate = estimate  # a model's memory need in MiB, for policy "auto"
        self.models_max = models_max
        # no device memory to settle (a CPU-only llama-server): in a zero_overlap switch
        # the leaving model's process exits while the next one loads
        self.exit_in_background = exit_in_background
        self.active: str | None = None
        # unloaded for idleness: the next request loads it back
        self.parked: str | None = None
        self.state = SwitchState.IDLE
        self.history: deque[SwitchReport] = deque(maxlen=config.history)
        self.current: SwitchReport | None = None
        self._execution: Execution | None = None  # the run in progress, for load progress events
        self.watchers: list[Watcher] = []  # see every phase and every finished report
        self._ids = itertools.count(1)

    async def execute(
        self, command: EngineCommand, listeners: list[Listener], hold: bool = False
    ) -> SwitchReport:
        """Carry out ``command``; the report says how it went.

        :class:`Recover` (also any command but a :class:`Snapshot` while the router is
        down): nothing is resident; restart the router if needed and load the target (no
        drain, no rollback). :class:`Snapshot`: keep the active model's KV snapshot,
        change nothing. :class:`Unload` with ``idle_after``: done only if no request came
        for that long; the model is then parked. ``hold``: if this run fails after it
        changed something, the gate stays closed (the caller runs another at once:
        requests wait for that one).
        """
        await self.lifecycle.exited()  # each command starts with no process on its way out
        snapshot = isinstance(command, Snapshot)
        down = self.process is not None and not self.process.running and not snapshot
        recover = isinstance(command, Recover) or down
        idle_after = command.idle_after if isinstance(command, Unload) else None
        target = _target(command, self.active)
        report = SwitchReport(
            id=next(self._ids),
            from_model=self.active,
            to_model=target,
            policy=policy_label(self.config.policy, recover, snapshot, idle_after),
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        self.current = report
        t0 = time.monotonic()
        try:
            await self._dispatch(command, report, listeners, recover)
        finally:
            if not (hold and report.failed and not report.changed_nothing):
                self.gate.open()
            self._finish(report, target, t0)
        return report

    async def _dispatch(
        self,
        command: EngineCommand,
        report: SwitchReport,
        listeners: list[Listener],
        recover: bool,
    ) -> None:
        target, session = report.to_model, None
        replay_session = True
        if isinstance(command, Switch):
            replay_session, session = command.replay_session, command.session
        if recover:
            self.state = SwitchState.RECOVERING
            self.gate.begin_recovery()  # requests wait for it, bounded like a switch
            self.active = None
            steps = plan_recovery(kv=self.kv is not None)
            if target is None:  # nothing was loaded: only the router comes back
                steps = (Step.RESTART,)
            await self._perform(Execution(report, listeners, None, target, replay_session), steps)
        elif isinstance(command, Snapshot):
            ex = Execution(report, listeners, self.active, self.active, replay_session=False)
            await self._perform(ex, (Step.SAVE,) if self.kv and self.active else ())
        elif (
            isinstance(command, Unload)
            and command.idle_after is not None
            and (self.active is None or self.gate.idle_for() < command.idle_after)
        ):
            report.outcome = Outcome.SKIPPED  # a request came meanwhile
        elif target == self.active and not (isinstance(command, Switch) and command.reload):
            report.outcome = Outcome.ALREADY_ACTIVE
        else:
            restart = self.process is not None and self.process.stale
            policy = await self._policy(report, target, restart)
            steps = plan(policy, self.active, target, self.kv is not None, restart)
            idle = isinstance(command, Unload) and command.idle_after is not None
            parking = self.active if idle else None
            ex = Execution(
                report,
                listeners,
                self.active,
                target,
                replay_session,
                policy=policy,
                session=session,
            )
            await self._perform(ex, steps)
            if parking is not None and not report.failed and self.active is None:
                self.parked = parking

    def _finish(self, report: SwitchReport, target: str | None, t0: float) -> None:
        """The run is over: the report's last fields, the history, the watchers, the log."""
        report.active_after = self.active
        report.total_ms = ms_since(t0)
        self.state = SwitchState.IDLE if self.active is not None else SwitchState.FAILED
        if target is None and not report.failed:
            self.state = SwitchState.IDLE  # unloaded on purpose: nothing failed
        self.current = None
        if report.outcome not in (Outcome.ALREADY_ACTIVE, Outcome.SKIPPED):
            # a no-op must not push real switches out of the bounded history
            self.history.append(report)
        for watcher in list(self.watchers):
            with contextlib.suppress(Exception):  # an observer must not break the loop
                watcher(report)
        log.info(
            "%s %s %s -> %s: %s in %.0f ms%s",
            # the stop's snapshot save is not a switch ("smollm2 -> smollm2" read as one)
            report.policy if report.policy in ("snapshot", "recover") else "switch",
            report.id,
            report.from_model,
            target,
            report.outcome.value,
            report.total_ms,
            f" ({report.error})" if report.error else "",
        )

    def configure(self, config: Config) -> None:
        """What a config reload changes for the engine (the controller calls this between
        two runs: a run reads one configuration from start to end)."""
        self.config = config.switch
        self.drain_timeout = config.server.switch_drain_timeout_seconds
        if self.process is not None:
            self.process.use_presets(config.presets)
        if self.kv is not None:
            self.kv.configure(config)

    async def _policy(self, report: SwitchReport, target: str | None, restart: bool) -> Policy:
        """The policy of this switch: the configured one, or what "auto" finds fits."""
        if restart:  # a router that must read new presets restarts with no model loaded
            report.policy, report.policy_reason = "zero_overlap", "the presets were reloaded"
            return "zero_overlap"
        if self.config.policy != "auto":
            return self.config.policy
        need = None
        if target is not None and self.estimate is not None:
            need = await asyncio.to_thread(self.estimate, target)
        chosen, why = choose_policy(
            "auto",
            self.models_max,
            free_mib(await self._read_gpu()),
            need,
            self.config.auto_margin_mib,
        )
        policy: Policy = "overlap" if chosen == "overlap" else "zero_overlap"
        report.policy, report.policy_reason = policy, f"auto: {why}"
        return policy

    def load_progress(self, model: str, value: float, stage: str | None) -> None:
        """The router reports how far the load of ``model`` is: a progress event of the
        LOAD step, when that is what runs now (the router's other news is not ours)."""
        ex = self._execution
        if ex is None or self.state is not SwitchState.LOADING or ex.target != model:
            return
        ex.emit(Step.LOAD.value, PhaseStatus.PROGRESS, detail=f"{stage or 'model'} {value:.0%}")

    async def _perform(self, ex: Execution, steps: tuple[Step, ...]) -> None:
        ex.watchers = self.watchers
        self._execution = ex
        try:
            await self._perform_steps(ex, steps)
        finally:
            self._execution = None

    async def _perform_steps(self, ex: Execution, steps: tuple[Step, ...]) -> None:
        deadline = self.config.switch_timeout_seconds
        ends = asyncio.get_running_loop().time() + deadline  # the timeout's, and the wait's
        same = ex.previous == ex.target
        beside = beside_load(steps, self._exits_in_background(ex), same)
        try:
            try:
                async with asyncio.timeout_at(ends):
                    for step in steps:
                        if step in beside:
                            if ex.beside is None:
                                ex.beside = asyncio.create_task(self._beside(ex, beside))
                            continue
                        ex.step = step
                        ex.started.append(step)
                        await self._step(step, ex)
                        if step is Step.LOAD:
                            await ex.join_beside()
            except TimeoutError:
                await ex.end_beside()
                raise StepFailedError(
                    ex.step or ex.started[-1],  # None: a step beside the load was joined
                    f"the switch did not finish within {deadline:g}s "
                    "([switch] switch_timeout_seconds)",
                ) from None
            ex.report.outcome = Outcome.OK
        except StepFailedError as failure:
            ex.emit(failure.step.value, PhaseStatus.FAILED, detail=str(failure))
            # the rollback must see what the steps beside the load did: the one running
            # ends (a save is kept), none starts (the previous model stays loaded)
            await ex.end_beside(max(0.0, ends - asyncio.get_running_loop().time()))
            report = ex.report
            if Step.ACTIVATE in ex.started[:-1]:
                # the target already serves: what failed after it is a warning
                report.warnings.append(str(failure))
                report.outcome = Outcome.OK
                return
            report.outcome = Outcome.FAILED
            report.error = str(failure)
            report.failed_phase = failure.step.value
            report.log_tail = failure.log_tail
            if failure.step not in (Step.CHECK, Step.DRAIN):  # those changed nothing
                await self._rollback(ex)
        finally:
            await ex.end_beside()  # cancelled: nothing may outlive the run

    async def _beside(self, ex: Execution, steps: tuple[Step, ...]) -> None:
        """Run ``steps`` while the main lane loads the target (see ``beside_load``)."""
        for step in steps:
            if ex.beside_stopped:
                return
            ex.started.append(step)
            await self._step(step, ex, lane=False)

    async def _step(self, step: Step, ex: Execution, lane: bool = True) -> None:
        """Run one step; ``lane``: the main one, whose step is the engine's state."""
        if lane and step in STEP_STATE:
            self.state = STEP_STATE[step]
        ex.emit(step.value, PhaseStatus.STARTED)
        started = ms_since(ex.t0)
        t = time.monotonic()
        detail = await self._do(step, ex)
        ms = ms_since(t)
        if isinstance(detail, Skipped):
            ex.emit(step.value, PhaseStatus.SKIPPED, detail=detail.why)
            return
        if step is not Step.ACTIVATE:
            ex.report.phases[step.value] = ms
            ex.report.phase_starts[step.value] = started
        ex.emit(step.value, PhaseStatus.DONE, ms, detail)

    async def _do(self, step: Step, ex: Execution) -> Detail:
        report, previous, target = ex.report, ex.previous, ex.target
        if step is Step.RESTART:
            return await self._restart()
        if step is Step.CHECK:
            assert target is not None
            return self._check(target)
        if step is Step.DRAIN:
            assert previous is not None  # plan() drains only when a model is active
            # zero_overlap (or an unload) holds new requests from here on; overlap lets
            # them go to the target, which is active already
            hold = target is None or report.policy != "overlap"
            return await self._drain(report, previous, close_gate=hold)
        if step is Step.UNLOAD:
            assert previous is not None
            return await self._unload(report, previous, self._exits_in_background(ex))
        if step is Step.SETTLE:
            return await self._settle(report)
        if step is Step.ACTIVATE:
            self.active = target  # from here on requests go to the target
            self.parked = None
            self.gate.open()
            return None
        if step in (Step.SAVE, Step.RESTORE):
            return await self._kv_step(step, ex)
        assert target is not None  # plan() loads and replays only a target
        if step is Step.LOAD:
            ex.loaded, detail = await self._load(report, target)
            return detail
        # a model that stayed resident kept its cache; after a restore, the replay
        # reads only what was added since, and proves the restore took
        if not (ex.replay_session or ex.restored) or not ex.loaded:
            return SKIPPED
        if ex.restored and Step.ACTIVATE in ex.started:
            # requests are let in: the replay would only hold up the next turn, which
            # reads what was added as well, and whose cache_n proves the restore
            return Skipped(RESTORED_SKIP)
        detail = await self._replay(report, target, ex.session)
        if ex.restored and report.replay is not None:
            self._verify_restore(ex, target)
        return detail

    def _exits_in_background(self, ex: Execution) -> bool:
        """Whether the leaving model's process exits while the target loads."""
        return (
            self.exit_in_background
            and self.config.background_exit  # live: a reload may turn it off
            and ex.target is not None
            and ex.policy == "zero_overlap"
        )

    async def _rollback(self, ex: Execution) -> None:
        """After a failed unload/load: the target must not stay resident (a load was
        attempted), and the previous model comes back (its unload was attempted)."""
        report, previous, target = ex.report, ex.previous, ex.target
        recovering = report.policy == "recover"
        self.state = SwitchState.RECOVERING if recovering else SwitchState.ROLLING_BACK
        ex.emit("rollback", PhaseStatus.STARTED)
        report.phase_starts["rollback"] = ms_since(ex.t0)
        t = time.monotonic()
        try:
            if target is not None and Step.LOAD in ex.started:
                await self.lifecycle.unload(target, self.config.unload_timeout_seconds)
            if previous is not None and Step.UNLOAD in ex.started:
                report.rolled_back = await self.lifecycle.load(
                    previous, self.config.load_timeout_seconds
                )
                if report.rolled_back:
                    await self._restore_previous(report, previous)
            self.active = previous
            status, detail = PhaseStatus.DONE, f"active: {self.active!r}"
        except HotModelError as exc:
            self.active = None
            report.error = f"{report.error}; rollback to {previous!r} failed: {summary(exc)}"
            status, detail = PhaseStatus.FAILED, summary(exc)
        report.phases["rollback"] = ms_since(t)
        ex.emit("rollback", status, report.phases["rollback"], detail)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "active": self.active,
            "current": None if self.current is None else self.current.to_json(),
        }


def _target(command: EngineCommand, active: str | None) -> str | None:
    """The model the command leaves loaded (None: none)."""
    if isinstance(command, Switch | Recover):
        return command.target
    return active if isinstance(command, Snapshot) else None
