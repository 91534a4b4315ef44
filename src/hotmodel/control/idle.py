"""Idle unload: after ``[router] idle_unload_seconds`` without requests, unload the model.

The unload is a command of the control loop like any other (KV snapshot
first, when snapshots are on); the engine re-checks the idleness when the
command runs, so a request that arrives meanwhile wins. The unloaded model is
*parked*: the next chat request loads it back (restore or replay) and waits
for it like a request held behind a switch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from hotmodel.config import RouterConfig
from hotmodel.control.commands import Unload
from hotmodel.control.controller import Controller
from hotmodel.control.traffic import TrafficGate
from hotmodel.errors import HotModelError

log = logging.getLogger("hotmodel.idle")

# How often the setting itself is looked at again while idle unload is off (a reload
# may turn it on); with it on, the loop sleeps exactly until the next deadline.
_OFF_POLL_S = 1.0


def idle_wait(idle_unload_s: float, idle_for: float, loaded: bool, busy: bool) -> float:
    """Seconds to sleep before looking again; 0: unload now. Pure, for the tests."""
    if idle_unload_s <= 0 or not loaded:
        return _OFF_POLL_S
    if busy:
        return min(idle_unload_s, _OFF_POLL_S)
    return max(0.0, idle_unload_s - idle_for)


class IdleUnloader:
    """The task that posts :class:`Unload` ``(idle_after=...)`` when the model sits idle."""

    def __init__(
        self, settings: Callable[[], RouterConfig], gate: TrafficGate, controller: Controller
    ) -> None:
        self.settings = settings  # read each time: a reload may change it
        self.gate = gate
        self.controller = controller
        self.unloads = 0

    async def run(self) -> None:
        while True:
            idle_s = self.settings().idle_unload_seconds
            wait = idle_wait(
                idle_s,
                self.gate.idle_for(),
                self.controller.active is not None,
                self.controller.busy,
            )
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            model = self.controller.active
            try:
                report = await self.controller.submit(Unload(idle_after=idle_s))
            except HotModelError as exc:  # shutting down, most likely
                log.info("idle unload not done: %s", exc)
                await asyncio.sleep(_OFF_POLL_S)
                continue
            if report.failed:
                log.warning("idle unload of %r failed: %s", model, report.error)
                await asyncio.sleep(idle_s)  # not again at once
            elif report.outcome.value == "ok":
                self.unloads += 1
                log.info("unloaded %r after %gs without requests", model, idle_s)
