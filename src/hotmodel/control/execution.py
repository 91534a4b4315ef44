"""One execution of a command by the engine: which steps started, who hears of them, helpers.

Split from ``engine.py`` so that the engine module holds only the step logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from hotmodel.control.plan import Step
from hotmodel.control.report import (
    Listener,
    PhaseStatus,
    SwitchEvent,
    SwitchReport,
    SwitchState,
    Watcher,
)
from hotmodel.errors import HotModelError, ModelLoadError
from hotmodel.sessions.service import SessionRef

STEP_STATE = {
    Step.RESTART: SwitchState.RECOVERING,
    Step.DRAIN: SwitchState.DRAINING,
    Step.UNLOAD: SwitchState.UNLOADING,
    Step.SETTLE: SwitchState.SETTLING,
    Step.LOAD: SwitchState.LOADING,
    Step.REPLAY: SwitchState.REPLAYING,
}


@dataclass
class Execution:
    """One run of the engine: what it was asked, and which steps it has started."""

    report: SwitchReport
    listeners: list[Listener]
    previous: str | None
    target: str | None
    replay_session: bool  # replay the session into the target after its load
    started: list[Step] = field(default_factory=list)
    watchers: list[Watcher] = field(default_factory=list)  # the engine's, for every run
    policy: str | None = None  # the switch policy chosen for this run (None: a special command)
    session: SessionRef | None = None  # the conversation it is for (None: the most recent)
    loaded: bool = False  # the LOAD step really loaded (the target was not resident)
    restored: bool = False  # the RESTORE step brought a KV snapshot back
    step: Step | None = None  # the main lane's step now (None: waiting for the one beside)
    beside: asyncio.Task[None] | None = None  # the steps running while the target loads
    beside_stopped: bool = False  # no further step beside the load may start
    t0: float = field(default_factory=time.monotonic)  # when it began (phase starts count from)

    async def join_beside(self) -> None:
        """Wait for the steps beside the load (see ``plan.beside_load``): their failure is
        the main lane's."""
        task = self.beside
        if task is None:
            return
        self.step = None
        try:
            await task
        finally:
            if task.done():
                self.beside = None

    async def end_beside(self, wait: float = 0.0) -> None:
        """Stop the steps beside the load: none starts any more, and the one running may
        end within ``wait`` seconds, else it is cancelled; a failure of theirs becomes a
        warning (after a first failure, or a cancellation)."""
        task = self.beside
        if task is None:
            return
        self.beside_stopped = True
        try:
            if wait > 0:
                await asyncio.wait([task], timeout=wait)
            task.cancel()
            await asyncio.wait([task])
        except asyncio.CancelledError:
            task.cancel()  # the caller's own cancellation: its finally waits for this one
            raise
        self.beside = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.report.warnings.append(str(exc))

    def emit(
        self, phase: str, status: PhaseStatus, ms: float | None = None, detail: str | None = None
    ) -> None:
        event = SwitchEvent(self.report.id, phase, status, ms, detail)
        for listener in [*self.listeners, *self.watchers]:
            with contextlib.suppress(Exception):  # a broken listener must not break a switch
                listener(event)


@dataclass(frozen=True, slots=True)
class Skipped:
    """What a step returns when it had nothing to do; ``why`` (if said) goes into its
    phase event. Any other return is the detail of a step that was done."""

    why: str | None = None


SKIPPED = Skipped()
Detail = str | Skipped | None


class StepFailedError(Exception):
    def __init__(self, step: Step, message: str, log_tail: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.log_tail = log_tail


def policy_label(policy: str, recover: bool, save_only: bool, idle_after: float | None) -> str:
    """What the report's ``policy`` says: the switch policy, or which special command."""
    if recover:
        return "recover"
    if save_only:
        return "snapshot"
    return "idle_unload" if idle_after is not None else policy


def summary(exc: HotModelError) -> str:
    """An error without the router log tail that a load failure carries."""
    return exc.summary if isinstance(exc, ModelLoadError) else str(exc)


def ms_since(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)
