"""Noticing that the router or the model's child died or hung, and asking for recovery.

The watchdog decides nothing itself: it posts a ``Recover`` command to the
control loop, which restarts the router if it is down and loads the model
again (both idempotent, so a spurious command costs a moment, not a model).
Four signals lead there:

- the router process exited while running (the supervisor's exit watcher);
- the router's event feed says the active model went ``unloaded`` while no
  command is running (its child crashed; the router does not restart it);
- the router stopped answering ``/health``: ``[router] watchdog_failures``
  checks in a row, ``watchdog_interval_seconds`` apart, fail while its process
  lives; the watchdog then kills it, and the exit watcher takes over;
- a chat request found the active model's own server refusing connections
  (``RouterClient.on_model_lost``): the router is asked at once, and again
  every 50 ms for up to :data:`CONFIRM_S`, until it too reads the model
  ``unloaded`` (it sees a child's exit within ~50 ms; a recovery started
  before that would find the model "already running" and load nothing).

The controller holds new requests at once on a crash (``Controller.recover``),
so requests that arrive before the command runs wait for the recovery instead
of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from hotmodel.config import Config
from hotmodel.control.commands import SyncResidents
from hotmodel.control.controller import Controller
from hotmodel.control.residents import ResidentState
from hotmodel.errors import HotModelError
from hotmodel.router.client import RouterClient
from hotmodel.router.events import ModelEvent
from hotmodel.router.models import ModelState
from hotmodel.router.supervisor import RouterSupervisor

log = logging.getLogger("hotmodel.control")

# How long a lost model's server is confirmed with the router before the next probe
# is left to decide.
CONFIRM_S = 2.0
CONFIRM_EVERY_S = 0.05


class Watchdog:
    def __init__(
        self,
        config: Config,
        supervisor: RouterSupervisor,
        router: RouterClient,
        controller: Controller,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.router = router
        self.controller = controller
        self.recoveries = 0
        self._confirming: asyncio.Task[None] | None = None
        router.on_model_lost = self.model_lost  # chat's direct path reports a dead port

    @property
    def enabled(self) -> bool:
        return self.config.router.restart_attempts > 0

    def _recover(self, why: str) -> None:
        if not self.enabled:
            return
        try:
            target = self.controller.recover()  # holds new requests for the recovery
        except HotModelError:  # shutting down: nothing to recover
            return
        log.warning("%s: recovering %r", why, target)
        self.recoveries += 1

    def router_exited(self, code: int) -> None:
        """The supervisor's exit callback."""
        self._recover(f"the router exited with code {code}")

    def model_event(self, event: ModelEvent) -> None:
        """The event feed's callback: an unload nobody asked for is a crashed child."""
        active = self.controller.active
        if (
            event.model in self.controller.residents.names
            and event.state is ModelState.UNLOADED
            and not self.controller.busy
            and self.enabled
        ):  # a resident's child: the control loop loads it again if it was loaded
            with contextlib.suppress(HotModelError):  # shutting down: nothing to bring back
                self.controller.post(SyncResidents(lost=event.model))
            return
        if (
            active is not None
            and event.model == active
            and event.state is ModelState.UNLOADED
            and not self.controller.busy
        ):
            self._recover(f"the model process of {active!r} ended on its own")

    async def _check_active_model(self) -> bool:
        """The backstop for a child that died while a command ran (its event was ignored),
        the active model's or a resident's; True when it asked for a recovery."""
        if self.controller.busy:
            return False
        try:
            models = await self.router.models()
        except HotModelError:
            return False  # the health probe decides about an unreachable router
        if self.controller.busy:
            return False  # a command began meanwhile: what it reads is its own
        residents = self.controller.residents
        for name in sorted(residents.names):
            status, state = models.get(name), residents.state(name)
            loaded = state is not None and state.state is ResidentState.LOADED
            gone = status is not None and status.state is ModelState.UNLOADED
            if loaded and gone and self.enabled:
                with contextlib.suppress(HotModelError):  # shutting down: nothing to bring back
                    self.controller.post(SyncResidents(lost=name))
        active = self.controller.active
        status = None if active is None else models.get(active)
        if status is not None and status.state is ModelState.UNLOADED:
            self._recover(f"the model process of {active!r} is gone")
            return True
        return False

    def model_lost(self, model: str) -> None:
        """A chat request found ``model``'s own server refusing connections: confirm it
        with the router and recover (unless a recovery or another command comes first)."""
        if not self.enabled or model != self.controller.active or self._confirming is not None:
            return
        self._confirming = asyncio.get_running_loop().create_task(self._confirm_lost(model))

    async def _confirm_lost(self, model: str) -> None:
        try:
            deadline = time.monotonic() + CONFIRM_S
            while self.controller.active == model and not self.controller.busy:
                if await self._check_active_model() or time.monotonic() > deadline:
                    return
                await asyncio.sleep(CONFIRM_EVERY_S)
        finally:
            self._confirming = None

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
