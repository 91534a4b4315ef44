"""Retention: sessions unused for ``[session] retention_days`` are deleted (0: kept forever).

A task of the runtime: it sweeps at start and then periodically (hourly, or
more often for a retention shorter than a few hours). It looks at the setting
every second (a reload may change it): a retention turned on sweeps at once,
a changed one at the next sweep it calls for. A session is deleted as ``DELETE
/v1/sessions/{id}`` does it (its KV snapshots with it), under its lock and
only if it was still unused then: a turn that comes in meanwhile keeps it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from hotmodel.config import SessionConfig
from hotmodel.errors import HotModelError
from hotmodel.sessions.service import ForgetsSessions, SessionService

log = logging.getLogger("hotmodel.sessions")

DAY_S = 86400.0
SWEEP_EVERY_S = 3600.0  # at most this long between sweeps
MIN_SWEEP_EVERY_S = 1.0
POLL_S = 1.0  # how often the setting is looked at (a reload may change it)


def sweep_due(retention_days: float, since_last_s: float) -> bool:
    """Whether to sweep now, ``since_last_s`` after the last sweep: hourly, or every
    quarter of a shorter retention (never while it is 0). Pure, for the tests."""
    if retention_days <= 0:
        return False
    every = min(SWEEP_EVERY_S, max(MIN_SWEEP_EVERY_S, retention_days * DAY_S / 4))
    return since_last_s >= every


class Retention:
    """The task that deletes sessions unused for longer than the retention."""

    def __init__(
        self,
        settings: Callable[[], SessionConfig],
        sessions: SessionService,
        kv: ForgetsSessions | None,
    ) -> None:
        self.settings = settings  # read each time: a reload may change it
        self.sessions = sessions
        self.kv = kv
        self.deleted = 0  # sessions deleted so far (for tests and logs)

    async def run(self) -> None:
        last = -math.inf  # the first sweep is at start
        while True:
            days = self.settings().retention_days
            if sweep_due(days, time.monotonic() - last):
                last = time.monotonic()
                try:
                    await self.sweep(days)
                except HotModelError as exc:  # the store failed: try again next time
                    log.warning("session retention sweep failed: %s", exc)
            await asyncio.sleep(POLL_S)

    async def sweep(self, days: float) -> int:
        """Delete every session unused for ``days``; returns how many went."""
        cutoff = time.time() - days * DAY_S
        gone = 0
        for owner, session_id in await self.sessions.store.unused_since(cutoff):
            try:
                if await self.sessions.delete(owner, session_id, self.kv, unused_before=cutoff):
                    gone += 1
            except HotModelError as exc:  # busy past the wait: it is in use, so it stays
                log.info("session %r kept by retention: %s", session_id, exc)
        if gone:
            self.deleted += gone
            log.info(
                "deleted %d session(s) unused for %g day(s) ([session] retention_days)", gone, days
            )
        return gone
