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

The commands are in ``commands.py``: :class:`Switch` (also the first load of the
default model at start), :class:`Unload`, :class:`Recover` (after the router or
the model's child died), :class:`Snapshot` (at stop) and :class:`Reconfigure` (a
config reload: what the engine reads changes between two runs, never during one)
and :class:`SyncResidents` (the resident models, ``residents.py``: loaded at start,
after a reload, after a command that restarted the router).
Everything else reads the loop's state through the controller's read-only
properties; the watchdog asks for a recovery through :meth:`Controller.recover`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from hotmodel.config import Config
from hotmodel.control.commands import (
    Command,
    Reconfigure,
    Recover,
    Reporting,
    Snapshot,
    Switch,
    SyncResidents,
    Unload,
)
from hotmodel.control.engine import Engine
from hotmodel.control.report import Listener, Outcome, SwitchReport, SwitchState, Watcher
from hotmodel.control.residents import Residents
from hotmodel.errors import (
    HotModelError,
    ModelNotFoundError,
    ModelResidentError,
    ShuttingDownError,
)

log = logging.getLogger("hotmodel.control")


def _outcome(command: Command) -> tuple[str, ...]:
    """Commands with the same outcome share one execution."""
    if isinstance(command, Switch):
        return ("switch", command.target, *(("reload",) if command.reload else ()))
    if isinstance(command, Recover):
        return ("recover",)
    if isinstance(command, Snapshot):
        return ("snapshot",)
    if isinstance(command, Reconfigure):
        return ("reconfigure", str(id(command)))  # each reload is its own
    if isinstance(command, SyncResidents):
        return ("residents", command.lost or "")
    return ("unload",) if isinstance(command, Unload) and command.idle_after is None else ("idle",)


@dataclass
class _Job:
    command: Command
    future: asyncio.Future[SwitchReport | None]  # None: a Reconfigure that loaded nothing
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
        self.residents = residents or Residents(engine.lifecycle)
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

    @property
    def loading(self) -> str | None:
        """The model the running command brings in (None: none runs, or it loads none)."""
        current = self.engine.current
        return None if current is None else current.to_model

    def watch(self, watcher: Watcher) -> None:
        """``watcher`` sees every command's phases and reports from now on."""
        self.engine.watchers.append(watcher)

    def load_progress(self, model: str, value: float, stage: str | None) -> None:
        """The router's load progress of ``model`` (its event feed), for the LOAD step."""
        self.engine.load_progress(model, value, stage)

    def recover(self) -> str | None:
        """The router or the active model's process died: hold new requests at once (they
        wait for the recovery instead of failing) and queue a :class:`Recover` of the
        model that was active, or that the running command was bringing in; that model
        (None: only the router comes back). Raises :class:`ShuttingDownError` at stop."""
        target = self.active or self.loading
        gate = self.engine.gate
        gate.close(for_recovery=True)
        try:
            self.post(Recover(target))
        except HotModelError:
            gate.begin_recovery()  # nothing will recover: let the held requests go
            gate.open()
            raise
        return target

    def park(self, model: str) -> None:
        """At start without preload: no model is loaded, and ``model`` is parked (the first
        request loads it). Before any command runs, so nothing races it."""
        if self._pending or self.engine.active is not None:
            raise RuntimeError("park() is for the start, before any command")
        self.engine.parked = model

    @property
    def exiting(self) -> frozenset[str]:
        """Models unloaded by a switch whose process is still exiting (CPU-only)."""
        return self.engine.lifecycle.exiting

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

    async def submit(self, command: Reporting, listener: Listener | None = None) -> SwitchReport:
        """Queue ``command`` (or join the same outcome's) and await its report.

        Cancelling the caller does not cancel the command: it belongs to the loop.
        """
        return await asyncio.shield(self.post(command, listener))

    async def reconfigure(
        self,
        config: Config,
        previous: Config,
        reload: str | None = None,
        revert: Callable[[], None] | None = None,
    ) -> SwitchReport | None:
        """A config reload (see :class:`Reconfigure`); the report of the load again of
        ``reload``, if asked. Commands posted from now on are checked against the new
        presets (they run after it)."""
        command = Reconfigure(config, previous, reload, revert)
        names = self.presets
        self.presets = frozenset(config.presets.models)
        try:
            return await asyncio.shield(self._post(command))
        except ShuttingDownError:
            self.presets = names
            raise

    def post(
        self, command: Reporting, listener: Listener | None = None
    ) -> asyncio.Future[SwitchReport]:
        """Queue ``command`` without waiting for it (see :meth:`_post`); every engine
        command ends with a report."""
        return cast("asyncio.Future[SwitchReport]", self._post(command, listener))

    def _post(
        self, command: Command, listener: Listener | None = None
    ) -> asyncio.Future[SwitchReport | None]:
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
            if isinstance(command, Reconfigure):
                report = await self._reconfigure(command, job.listeners)
            elif isinstance(command, SyncResidents):
                report = await self._sync_residents(command.lost)
            else:
                report = await self.engine.execute(command, job.listeners)
            if report is not None and _restarted(report):
                # the router took every resident with it: back they come
                await self.residents.sync(self.engine.config, restarted=True)
        except asyncio.CancelledError:
            job.future.set_exception(ShuttingDownError("hotmodel stopped during the switch"))
            raise
        except Exception as exc:  # a bug: the callers hear of it, the loop goes on
            log.exception("command %r failed", command)
            job.future.set_exception(exc)
        else:
            job.future.set_result(report)

    async def _reconfigure(
        self, command: Reconfigure, listeners: list[Listener]
    ) -> SwitchReport | None:
        self.engine.configure(command.config)
        self.residents.names = frozenset(command.config.presets.residents)
        report = await self._load_again(command, listeners)
        if command.config.presets.residents or command.previous.presets.residents:
            await self.residents.sync(self.engine.config)  # removed ones go, failed ones retry
        return report

    async def _load_again(
        self, command: Reconfigure, listeners: list[Listener]
    ) -> SwitchReport | None:
        """A reload's load again of the active model; if it fails, the previous
        configuration comes back and the model is loaded again with it."""
        if command.reload is None or command.reload != self.engine.active:
            return None  # (a switch since the reload read it: the next load reads the preset)
        again = Switch(command.reload, reload=True)
        # if it fails, requests held by it wait for the switch back too
        report = await self.engine.execute(again, listeners, hold=True)
        if not report.failed:
            return report
        try:
            previous = command.previous  # the configuration that worked is in force again
            self.engine.configure(previous)
            self.presets = frozenset(previous.presets.models)
            self.residents.names = frozenset(previous.presets.residents)
            if command.revert is not None:
                command.revert()
            if not report.changed_nothing:
                report.reverted = await self.engine.execute(again, listeners)
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
