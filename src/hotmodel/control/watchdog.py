"""Noticing that the router or the model's child died or hung, and asking for recovery.

The watchdog decides nothing itself: it posts a ``Recover`` command to the
control loop, which restarts the router if it is down and loads the model
again (both idempotent, so a spurious command costs a moment, not a model).
Three signals lead there:

- the router process exited while running (the supervisor's exit watcher);
- the router's event feed says the active model went ``unloaded`` while no
  command is running (its child crashed; the router does not restart it);
- the router stopped answering ``/health``: ``[router] watchdog_failures``
  checks in a row, ``watchdog_interval_seconds`` apart, fail while its process
  lives; the watchdog then kills it, and the exit watcher takes over.

The traffic gate is closed at once on a crash, so requests that arrive before
the command runs wait for the recovery instead of failing.
"""

from __future__ import annotations

import asyncio
import logging

from hotmodel.config import Config
from hotmodel.control.controller import Controller, Recover
from hotmodel.control.traffic import TrafficGate
from hotmodel.errors import HotModelError
from hotmodel.router.client import RouterClient
from hotmodel.router.events import ModelEvent
from hotmodel.router.models import ModelState
from hotmodel.router.supervisor import RouterSupervisor

log = logging.getLogger("hotmodel.control")


class Watchdog:
    def __init__(
        self,
        config: Config,
        supervisor: RouterSupervisor,
        router: RouterClient,
        controller: Controller,
        gate: TrafficGate,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.router = router
        self.controller = controller
        self.gate = gate
        self.recoveries = 0

    @property
    def enabled(self) -> bool:
        return self.config.router.restart_attempts > 0

    def _target(self) -> str | None:
        """The model to bring back: the active one, or the one a running command was
        bringing in (None when none was loaded, e.g. after an unload)."""
        current = self.controller.engine.current
        return self.controller.active or (current.to_model if current is not None else None)

    def _recover(self, why: str) -> None:
        if not self.enabled:
            return
        target = self._target()
        log.warning("%s: recovering %r", why, target)
        self.gate.close(for_recovery=True)
        try:
            self.controller.post(Recover(target))
        except HotModelError:  # shutting down: nothing to recover
            self.gate.begin_recovery()
            self.gate.open()
            return
        self.recoveries += 1

    def router_exited(self, code: int) -> None:
        """The supervisor's exit callback."""
        self._recover(f"the router exited with code {code}")

    def model_event(self, event: ModelEvent) -> None:
        """The event feed's callback: an unload nobody asked for is a crashed child."""
        active = self.controller.active
        if (
            active is not None
            and event.model == active
            and event.state is ModelState.UNLOADED
            and not self.controller.busy
        ):
            self._recover(f"the model process of {active!r} ended on its own")

    async def _check_active_model(self) -> None:
        """The backstop for a child that died while a command ran (its event was ignored)."""
        active = self.controller.active
        if active is None or self.controller.busy:
            return
        try:
            status = (await self.router.models()).get(active)
        except HotModelError:
            return  # the health probe decides about an unreachable router
        if status is not None and status.state is ModelState.UNLOADED and not self.controller.busy:
            self._recover(f"the model process of {active!r} is gone")

    async def run(self) -> None:
        """Probe ``/health`` until cancelled (the runtime owns this task)."""
        interval = self.config.router.watchdog_interval_seconds
        if interval <= 0 or not self.enabled:
            return
        failures = 0
        while True:
            await asyncio.sleep(interval)
            if not self.supervisor.running or self.controller.busy:
                failures = 0
                continue
            if await self.router.health():
                failures = 0
                await self._check_active_model()
                continue
            failures += 1
            if failures >= self.config.router.watchdog_failures:
                log.error(
                    "the router did not answer /health %d times in a row ([router] "
                    "watchdog_failures); killing it so that it is restarted",
                    failures,
                )
                failures = 0
                await asyncio.to_thread(self.supervisor.kill)
