"""The control loop: every change of the router's model set is a command on one queue.

One task (:meth:`Controller.run`) takes commands in order and executes each
through the :class:`~hotmodel.control.engine.Engine`, which owns the active
model; nothing else loads or unloads. Callers :meth:`~Controller.submit` a
command and await its report. A command for an outcome that is already queued
or running (the same target) joins it: one execution, one report, every
caller's progress listener fed. The command runs in the loop's task, so a
caller that goes away (a client disconnect) cannot stop it half-way.

Commands today: :class:`Switch` (also the first load of the default model at
start, and the rollback inside it) and :class:`Unload`. Crash recovery and
config reload come as more commands on the same queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from hotmodel.control.engine import Engine
from hotmodel.control.report import Listener, SwitchReport, SwitchState
from hotmodel.errors import ModelNotFoundError, ShuttingDownError

log = logging.getLogger("hotmodel.control")


@dataclass(frozen=True, slots=True)
class Switch:
    """Make ``target`` the active model. ``replay=False`` skips the session prefill
    (the first load at start, where no conversation is waiting)."""

    target: str
    replay: bool = True


@dataclass(frozen=True, slots=True)
class Unload:
    """Unload the active model: afterwards no model is loaded."""


Command = Switch | Unload


def _outcome(command: Command) -> str | None:
    """Commands with the same outcome share one execution."""
    return command.target if isinstance(command, Switch) else None


@dataclass
class _Job:
    command: Command
    future: asyncio.Future[SwitchReport]
    listeners: list[Listener] = field(default_factory=list)


class Controller:
    """The one writer of the router's model set: a queue and the task that drains it."""

    def __init__(self, engine: Engine, presets: Collection[str]) -> None:
        self.engine = engine
        self.presets = frozenset(presets)
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._jobs: dict[str | None, _Job] = {}  # queued or running, by outcome
        self._closed = False

    @property
    def active(self) -> str | None:
        return self.engine.active

    @property
    def state(self) -> SwitchState:
        return self.engine.state

    @property
    def busy(self) -> bool:
        """A command is queued or running."""
        return bool(self._jobs)

    def check_target(self, target: str) -> None:
        """Raise :class:`ModelNotFoundError` unless ``target`` is a preset."""
        if target not in self.presets:
            known = ", ".join(sorted(self.presets))
            raise ModelNotFoundError(
                f"model {target!r} is not a preset (known: {known})", param="model"
            )

    async def submit(self, command: Command, listener: Listener | None = None) -> SwitchReport:
        """Queue ``command`` (or join the same outcome's) and await its report.

        Cancelling the caller does not cancel the command: it belongs to the loop.
        """
        if isinstance(command, Switch):
            self.check_target(command.target)
        if self._closed:
            raise ShuttingDownError("hotmodel is shutting down; no new switch is started")
        key = _outcome(command)
        job = self._jobs.get(key)
        if job is None:
            job = _Job(command, asyncio.get_running_loop().create_future())
            self._jobs[key] = job
            self._queue.put_nowait(job)
        if listener is not None:
            job.listeners.append(listener)
        return await asyncio.shield(job.future)

    async def run(self) -> None:
        """Execute commands in order until cancelled (the runtime owns this task)."""
        while True:
            job = await self._queue.get()
            try:
                await self._execute(job)
            finally:
                del self._jobs[_outcome(job.command)]

    async def _execute(self, job: _Job) -> None:
        command = job.command
        try:
            if isinstance(command, Switch):
                report = await self.engine.run(command.target, job.listeners, command.replay)
            else:
                report = await self.engine.run(None, job.listeners)
        except asyncio.CancelledError:
            job.future.set_exception(ShuttingDownError("hotmodel stopped during the switch"))
            job.future.exception()  # retrieved: callers re-raise it themselves
            raise
        except Exception as exc:  # a bug: the callers hear of it, the loop goes on
            log.exception("command %r failed", command)
            job.future.set_exception(exc)
            job.future.exception()
        else:
            job.future.set_result(report)

    def close(self) -> None:
        """Take no more commands; every queued one fails with :class:`ShuttingDownError`.

        The running one is ended by cancelling :meth:`run` (the runtime does that).
        """
        self._closed = True
        while not self._queue.empty():
            job = self._queue.get_nowait()
            del self._jobs[_outcome(job.command)]
            if not job.future.done():
                job.future.set_exception(ShuttingDownError("hotmodel is shutting down"))
                job.future.exception()  # retrieved: callers re-raise it themselves
