"""What a command of the control loop did, as typed values (serialized only in ``to_json``)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hotmodel.control.gpu import GpuReading


class SwitchState(enum.Enum):
    """What the control loop is doing now."""

    IDLE = "idle"
    RECOVERING = "recovering"
    DRAINING = "draining"
    UNLOADING = "unloading"
    SETTLING = "settling"
    LOADING = "loading"
    REPLAYING = "replaying"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"  # no model is loaded: the last switch and its rollback failed


class Outcome(enum.Enum):
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    ALREADY_ACTIVE = "already_active"
    SKIPPED = "skipped"  # an idle unload that a request made moot


class PhaseStatus(enum.Enum):
    STARTED = "started"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    PROGRESS = "progress"  # a long step's progress (the router's load), ``detail`` says how far


@dataclass
class GpuReadings:
    """GPU memory read around a switch; None where no GPU is visible."""

    before_unload: GpuReading | None = None
    after_unload: GpuReading | None = None
    after_settle: GpuReading | None = None
    after_load: GpuReading | None = None

    def to_json(self) -> dict[str, dict[str, Any] | None]:
        return {
            name: None if snap is None else snap.to_json()
            for name, snap in (
                ("before_unload", self.before_unload),
                ("after_unload", self.after_unload),
                ("after_settle", self.after_settle),
                ("after_load", self.after_load),
            )
        }


@dataclass
class SwitchReport:
    """What one switch (or unload) did; returned to the caller and kept in the history."""

    id: int
    from_model: str | None
    to_model: str | None  # None: an unload
    policy: str
    started_at: str
    policy_reason: str | None = None  # why policy "auto" chose this one
    reason: str | None = None  # why the scheduler switched ("batch: 5 waiting for ...")
    expected_ms: float | None = None  # the load time it expected (measured before)
    outcome: Outcome = Outcome.RUNNING
    error: str | None = None
    failed_phase: str | None = None  # the step that failed (``drain``: nothing changed)
    rolled_back: bool = False
    active_after: str | None = None
    total_ms: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    # ms from the command's start to each phase's start: phases may overlap (a CPU-only
    # switch saves and unloads the leaving model beside the next one's load)
    phase_starts: dict[str, float] = field(default_factory=dict)
    gpu: GpuReadings = field(default_factory=GpuReadings)
    drained: int = 0
    cancelled: int = 0
    replay: dict[str, Any] | None = None
    snapshot: dict[str, Any] = field(default_factory=dict)  # "save" / "restore" results
    warnings: list[str] = field(default_factory=list)
    log_tail: str | None = None
    # a reload's switch that failed: the switch back under the previous configuration
    # (its own report, kept in the history too; not part of this one's JSON)
    reverted: SwitchReport | None = None

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAILED

    @property
    def drain_timed_out(self) -> bool:
        """It failed at its drain: generations on the active model outlived the deadline,
        and nothing was changed (the switch must wait, it did not break anything)."""
        return self.failed and self.failed_phase == "drain"

    @property
    def changed_nothing(self) -> bool:
        """It failed before touching the running model (its check, or its drain)."""
        return self.failed and self.failed_phase in ("check", "drain")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "from": self.from_model,
            "to": self.to_model,
            "policy": self.policy,
            "policy_reason": self.policy_reason,
            "reason": self.reason,
            "expected_ms": self.expected_ms,
            "started_at": self.started_at,
            "outcome": self.outcome.value,
            "error": self.error,
            "failed_phase": self.failed_phase,
            "rolled_back": self.rolled_back,
            "active_after": self.active_after,
            "total_ms": self.total_ms,
            "phases": dict(self.phases),
            "phase_starts": dict(self.phase_starts),
            "gpu": self.gpu.to_json(),
            "drained": self.drained,
            "cancelled": self.cancelled,
            "replay": self.replay,
            "snapshot": dict(self.snapshot),
            "warnings": list(self.warnings),
            "log_tail": self.log_tail,
        }


@dataclass(frozen=True, slots=True)
class SwitchEvent:
    """Progress of a switch: a step started, ended, failed or was skipped."""

    switch_id: int
    phase: str
    status: PhaseStatus
    ms: float | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "switch_id": self.switch_id,
            "phase": self.phase,
            "status": self.status.value,
            "ms": self.ms,
            "detail": self.detail,
        }


Listener = Callable[[SwitchEvent], None]
# Sees every command's phases and, when it ends, its report (the dashboard feed, metrics).
Watcher = Callable[["SwitchEvent | SwitchReport"], None]
