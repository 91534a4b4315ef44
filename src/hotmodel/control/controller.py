"""The control loop: every change of the router's model set is a command on one queue.

One task (:meth:`Controller.run`) takes commands in order and executes each
through the :class:`~hotmodel.control.engine.Engine`, which owns the active
model; nothing else loads or unloads. Callers :meth:`~Controller.submit` a
command and await its report. A command for the same outcome as the newest
queued or running one (the same target) joins it: one execution, one report,
every caller's progress listener fed; behind another command it queues anew,
so commands always take effect in the order they were given. The command runs
in the loop's task, so a caller that goes away (a client disconnect) cannot
stop it half-way.

Commands today: :class:`Switch` (also the first load of the default model at
start, and the rollback inside it), :class:`Unload`, :class:`Recover`
(after the router or the model's child died) and :class:`SyncResidents` (the
resident models, ``residents.py``: loaded at start, after a reload, after a
command that restarted the router). A config reload applies its live settings
at once and changes the model set only through these commands.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from hotmodel.control.engine import Engine
from hotmodel.control.report import Listener, Outcome, SwitchReport, SwitchState, Watcher
from hotmodel.control.residents import Residents
from hotmodel.errors import ModelNotFoundError, ModelResidentError, ShuttingDownError

log = logging.getLogger("hotmodel.control")


@dataclass(frozen=True, slots=True)
class Switch:
    """Make ``target`` the active model. ``replay=False`` skips the session prefill
    (the first load at start, where no conversation is waiting)."""

    target: str
    replay: bool = True
    reload: bool = False  # load it again even if active (a reload changed its preset)
    # a reload's: put the previous configuration back if the switch fails; the switch
    # back then runs in the same command (nothing queued meanwhile runs in between)
    revert: Callable[[], None] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Unload:
    """Unload the active model: afterwards no model is loaded. ``idle_after``: an idle
    unload, done only if no request came for that many seconds; the model is parked
    and the next request loads it back."""

    idle_after: float | None = None


@dataclass(frozen=True, slots=True)
class Recover:
    """The router or the model's child died: restart the router if it is down, then load
    ``target`` again and replay the most recent session (None: no model was loaded, so
    only the router comes back)."""

    target: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Keep the active model's KV snapshot, change nothing (at stop, so that the next
    start finds the conversation in the cache)."""


@dataclass(frozen=True, slots=True)
class SyncResidents:
    """Load every resident model that is not loaded, unload those no longer configured;
    ``lost``: this one's process ended on its own (load it again)."""

    lost: str | None = None


Command = Switch | Unload | Recover | Snapshot | SyncResidents


def _outcome(command: Command) -> tuple[str, ...]:
    """Commands with the same outcome share one execution."""
    if isinstance(command, Switch):
        return ("switch", command.target, *(("reload",) if command.reload else ()))
    if isinstance(command, Recover):
        return ("recover",)
    if isinstance(command, Snapshot):
        return ("snapshot",)
    if isinstance(command, SyncResidents):
        return ("residents", command.lost or "")
    return ("unload",) if isinstance(command, Unload) and command.idle_after is None else ("idle",)


@dataclass
class _Job:
    command: Command
    future: asyncio.Future[SwitchReport]
    listeners: list[Listener] = field(default_factory=list)
    started: bool = False


class Controller:
    """The one writer of the router's model set: a queue and the task that drains it."""

    def __init__(
        self, engine: Engine, presets: Collection[str], residents: Residents | None = None
    ) -> None:
        self.engine = engine
        self.presets = frozenset(presets)
        # the models loaded beside the active one (none: an empty set, never loaded)
        self.residents = residents or Residents(engine.router)
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._last: _Job | None = None  # the newest job, queued or running, until it ends
        self._pending = 0  # jobs queued or running
        self._closed = False

    @property
    def active(self) -> str | None:
        return self.engine.active

    @property
    def state(self) -> SwitchState:
        return self.engine.state

    @property
    def parked(self) -> str | None:
        """The model unloaded for idleness (or not preloaded): the next request loads it."""
        return self.engine.parked

    @property
    def history(self) -> Sequence[SwitchReport]:
        """The last ``[switch] history`` reports, oldest first (read-only)."""
        return tuple(self.engine.history)

    def status(self) -> dict[str, Any]:
        """The control loop's state for ``/admin/status``."""
        return self.engine.status()

    def watch(self, watcher: Watcher) -> None:
        """``watcher`` sees every command's phases and reports from now on."""
        self.engine.watchers.append(watcher)

    def park(self, model: str) -> None:
        """At start without preload: no model is loaded, and ``model`` is parked (the first
        request loads it). Before any command runs, so nothing races it."""
        if self._pending or self.engine.active is not None:
            raise RuntimeError("park() is for the start, before any command")
        self.engine.parked = model

    @property
    def exiting(self) -> frozenset[str]:
        """Models unloaded by a switch whose process is still exiting (CPU-only)."""
        return self.engine.router.exiting

    @property
    def busy(self) -> bool:
        """A command is queued or running."""
        return self._pending > 0

    def check_target(self, target: str) -> None:
        """Raise :class:`ModelNotFoundError` unless ``target`` is a preset, and
        :class:`ModelResidentError` when it is a resident one (never switched to)."""
        if target not in self.presets:
            raise ModelNotFoundError.not_a_preset(target, sorted(self.presets))
        if target in self.residents.names:
            raise ModelResidentError(
                f"model {target!r} is resident (resident = true): it stays loaded beside the "
                "active model and is served directly; it is not a switch target",
                param="model",
            )

    async def submit(self, command: Command, listener: Listener | None = None) -> SwitchReport:
        """Queue ``command`` (or join the same outcome's) and await its report.

        Cancelling the caller does not cancel the command: it belongs to the loop.
        """
        return await asyncio.shield(self.post(command, listener))

    def post(
        self, command: Command, listener: Listener | None = None
    ) -> asyncio.Future[SwitchReport]:
        """Queue ``command`` without waiting for it.

        It joins the newest job instead when that has the same outcome: nothing is
        queued behind it, so sharing its run changes no order (joining an older job
        would report a target that a later command has already replaced).
        """
        if isinstance(command, Switch | Recover) and command.target is not None:
            self.check_target(command.target)
        if self._closed:
            raise ShuttingDownError("hotmodel is shutting down; no new switch is started")
        job = self._last
        # A crash after a recovery started (past its restart) needs a recovery of its own.
        stale = job is not None and job.started and isinstance(command, Recover)
        if job is None or stale or job.future.done() or _outcome(job.command) != _outcome(command):
            job = _Job(command, asyncio.get_running_loop().create_future())
            # a posted command may have no waiter: its failure is logged, not lost
            job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._last = job
            self._pending += 1
            self._queue.put_nowait(job)
        if listener is not None:
            job.listeners.append(listener)
        return job.future

    async def run(self) -> None:
        """Execute commands in order until cancelled (the runtime owns this task)."""
        while True:
            job = await self._queue.get()
            try:
                await self._execute(job)
            finally:
                self._pending -= 1
                if self._last is job:
                    self._last = None
            await _hand_over()

    async def _execute(self, job: _Job) -> None:
        job.started = True
        command = job.command
        try:
            if isinstance(command, Switch):
                report = await self._switch(command, job.listeners)
            elif isinstance(command, Recover):
                report = await self.engine.run(command.target, job.listeners, recover=True)
            elif isinstance(command, Snapshot):
                report = await self.engine.run(self.engine.active, job.listeners, save_only=True)
            elif isinstance(command, SyncResidents):
                report = await self._sync_residents(command.lost)
            else:
                report = await self.engine.run(None, job.listeners, idle_after=command.idle_after)
            if _restarted(report):  # the router took every resident with it: back they come
                await self.residents.sync(self.engine.config, restarted=True)
        except asyncio.CancelledError:
            job.future.set_exception(ShuttingDownError("hotmodel stopped during the switch"))
            raise
        except Exception as exc:  # a bug: the callers hear of it, the loop goes on
            log.exception("command %r failed", command)
            job.future.set_exception(exc)
        else:
            job.future.set_result(report)

    async def _switch(self, command: Switch, listeners: list[Listener]) -> SwitchReport:
        target, replay = command.target, command.replay
        # with a revert to run, requests held by a failed switch wait for it too
        hold = command.revert is not None
        report = await self.engine.run(target, listeners, replay, reload=command.reload, hold=hold)
        if command.revert is None or not report.failed:
            return report
        try:
            command.revert()  # the configuration that worked is in force again
            if not report.changed_nothing:
                report.reverted = await self.engine.run(target, listeners, replay, reload=True)
        finally:
            self.engine.gate.open()  # held or not, requests are let go now
        return report

    async def _sync_residents(self, lost: str | None) -> SwitchReport:
        """A report of its own (not a switch: kept out of the history), failed when a
        resident could not be loaded."""
        report = SwitchReport(0, None, None, "residents", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if lost is not None and not self.residents.lost(lost):
            report.outcome = Outcome.SKIPPED  # not loaded by us: nothing was lost
            return report
        errors = await self.residents.sync(self.engine.config)
        report.outcome = Outcome.FAILED if errors else Outcome.OK
        report.error = "; ".join(errors) or None
        return report

    def close(self) -> None:
        """Take no more commands; every queued one fails with :class:`ShuttingDownError`.

        The running one is ended by cancelling :meth:`run` (the runtime does that).
        """
        self._closed = True
        while not self._queue.empty():
            job = self._queue.get_nowait()
            self._pending -= 1
            if not job.future.done():
                job.future.set_exception(ShuttingDownError("hotmodel is shutting down"))


def _restarted(report: SwitchReport) -> bool:
    """Whether the command started the router again (its RESTART step was done), or the
    switch back of a reverted reload did."""
    return "restart" in report.phases or (
        report.reverted is not None and "restart" in report.reverted.phases
    )


async def _hand_over() -> None:
    """Let the requests that waited for the command just finished take their tickets before
    the next one closes the gate: a request whose switch has just been made must be answered
    by that model, not lose its turn to a switch away queued behind it. A waiter wakes
    through its shielded future (two callbacks), then takes a ticket without waiting."""
    for _ in range(_HANDOVER_TURNS):
        await asyncio.sleep(0)


_HANDOVER_TURNS = 4
