"""The scheduler: requests for another model wait in that model's queue, and one switch
admits them all.

Requests for the loaded model are admitted at once. A request for another
preset (``[switch] auto``) joins that preset's queue instead of causing a
switch of its own. The decision of when to switch, and to which model, is the
pure :func:`decide`, asked again whenever something changes (a request joins
a queue or leaves it, a request on the loaded model starts or ends, a switch
ends) or a deadline it named comes. It switches:

- at once when no model is loaded;
- when a waiter has waited ``[switch] max_wait_seconds`` (the fairness bound:
  a client that keeps its own model busy cannot starve the others);
- when the loaded model has had no request in flight for ``[switch]
  linger_seconds`` (a client looping on its model keeps it: the gap between
  two of its requests is shorter) and has been loaded ``[switch]
  min_resident_seconds``.

It picks the model whose lead waiter has waited longest, its priority (the
preset's ``priority`` plus its API key's, ``[security] key_priorities``)
counting ``[switch] aging_seconds`` a point, each further waiter counting
:data:`BATCH_BONUS_S`, and the switch's cost (measured load, and replay unless a
KV snapshot saves it) counting against it; a waiter past the fairness bound
always goes first (``control/decide.py``). Within a queue, waiters go in the
same order: highest priority plus wait first. The switch it asks for is an
ordinary command of the control loop (which drains the loaded model and holds
new requests meanwhile); when it ends, every waiter of that model is released
at once, or gets the switch's error. A waiter whose client leaves is removed
at once; past ``[switch] max_queue`` waiters a request is refused with 429. A waiter
may be told its :class:`Position` when it changes (a stream shows it to its client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hotmodel.control.commands import Switch
from hotmodel.control.controller import Controller
from hotmodel.control.decide import (
    DEFAULT_LOAD_S,
    Decision,
    Rules,
    View,
    Waiting,
    cost_s,
    decide,
)
from hotmodel.control.report import SwitchReport
from hotmodel.control.traffic import TrafficGate
from hotmodel.errors import (
    QueueFullError,
    ShuttingDownError,
    SwitchBusyError,
    SwitchFailedError,
)
from hotmodel.sessions.service import SessionRef

# the pure decision lives in control/decide.py; its types are this module's API too
__all__ = ["Decision", "Rules", "Scheduler", "View", "Waiting", "decide"]

log = logging.getLogger("hotmodel.scheduler")

RETRY_AFTER_DRAIN_S = 1.0  # a switch that could not drain is tried again after this
_HANDOVER_TURNS = 8  # loop turns for released waiters to be admitted before deciding again
POSITION_EVERY_S = 5.0  # a waiter told its position hears it at least this often


@dataclass(frozen=True, slots=True)
class Position:
    """Where a waiter stands: ``place`` of ``waiting`` in ``model``'s line (1 goes first)."""

    model: str
    place: int
    waiting: int
    waited_s: float

    def __str__(self) -> str:
        return (
            f"queued {self.place} of {self.waiting} for {self.model}, waited {self.waited_s:.1f} s"
        )


Tell = Callable[[Position], Awaitable[None]]


@dataclass(eq=False)
class _Waiter:
    model: str
    since: float
    session: SessionRef | None  # the switch is for this request's conversation
    done: asyncio.Future[None]
    priority: int = 0  # its preset's plus its API key's
    moved: asyncio.Future[None] | None = None  # resolved when the queues change

    def rank(self, aging: float) -> float:
        """Its place in line (lower goes first): when it joined, a priority point moving it
        ``aging`` seconds earlier."""
        return self.since - aging * self.priority


def _no_snapshot(model: str, session: SessionRef) -> bool:
    return False


class Scheduler:
    """The queues, and the task that turns :func:`decide` into switches."""

    def __init__(
        self,
        controller: Controller,
        gate: TrafficGate,
        rules: Callable[[], Rules],
        max_queue: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
        slots: Callable[[str], int] = lambda model: 1,
        priority: Callable[[str], int] = lambda model: 0,
        snapshot: Callable[[str, SessionRef], bool] = _no_snapshot,
    ) -> None:
        self._controller = controller
        self._gate = gate
        self._rules = rules
        self._max_queue = max_queue
        self._clock = clock
        self._slots = slots  # requests a model serves at once (its np, [router] parallel)
        self._priority = priority  # a preset's priority
        self._snapshot = snapshot  # whether a session has a KV snapshot for a model
        self._waiters: list[_Waiter] = []
        self._changed = asyncio.Event()
        self._resident: tuple[str | None, float] = (controller.active, clock())
        self._released_for = controller.active  # the model whose whole queue was let go
        self.measured_load_s: dict[str, float] = {}  # measured, per model
        self.measured_replay_s: dict[str, float] = {}  # measured, per model (without a restore)
        gate.on_change = self._changed.set

    def poke(self, *_: object) -> None:
        """Something changed outside (a switch someone else asked for ended): decide again."""
        self._changed.set()

    def now(self) -> float:
        """The scheduler's clock (a waiter that waits again keeps its first ``since``)."""
        return self._clock()

    def _in_line(self, model: str) -> list[_Waiter]:
        """``model``'s waiters in the order they go: by priority and wait."""
        aging = self._rules().aging
        return sorted((w for w in self._waiters if w.model == model), key=lambda w: w.rank(aging))

    def queues(self) -> dict[str, Waiting]:
        """Every model with waiters: how many, since when the oldest waits, and its lead
        waiter (the first it would let go)."""
        out: dict[str, Waiting] = {}
        for model in dict.fromkeys(w.model for w in self._waiters):
            line = self._in_line(model)
            lead = line[0]
            oldest = min(w.since for w in line)
            out[model] = Waiting(len(line), oldest, lead.priority, lead.since)
        return out

    def status(self) -> dict[str, dict[str, float | int]]:
        """Per model: waiting, and the oldest wait in seconds (``/admin/status``)."""
        now = self._clock()
        return {
            m: {
                "waiting": q.count,
                "oldest_wait_s": round(now - q.oldest, 3),
                "lead_priority": q.priority,
            }
            for m, q in self.queues().items()
        }

    async def wait_for(
        self,
        model: str,
        session: SessionRef | None,
        timeout: float,
        priority: int = 0,
        since: float | None = None,
        tell: Tell | None = None,
    ) -> None:
        """Wait in ``model``'s queue until a switch to it ends; raises that switch's error,
        :class:`SwitchBusyError` past ``timeout``, :class:`QueueFullError` at once when
        ``[switch] max_queue`` requests already wait. ``priority``: its API key's (the
        preset's is added); ``since``: when it first joined a queue (a request that waits
        again, another switch having come first, keeps its place: :meth:`now`); ``tell``
        hears its :class:`Position` when it changes, and every :data:`POSITION_EVERY_S`."""
        limit = self._max_queue()
        if len(self._waiters) >= limit:
            raise QueueFullError.over(limit, self._retry_after(model))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        joined = self._clock() if since is None else since
        waiter = _Waiter(model, joined, session, done, self._priority(model) + priority)
        self._waiters.append(waiter)
        self._changed.set()
        self._moved()
        try:
            async with asyncio.timeout(timeout):
                await (done if tell is None else self._telling(waiter, tell))
        except TimeoutError:
            raise SwitchBusyError(
                f"waited {timeout:g}s for {model!r} to be loaded ([switch] "
                "queue_timeout_seconds); try again later"
            ) from None
        finally:
            if waiter in self._waiters:  # a client that left, or the timeout
                self._waiters.remove(waiter)
                self._changed.set()
                self._moved()

    def position(self, waiter: _Waiter) -> Position | None:
        """Where ``waiter`` stands (None: it left the queue)."""
        line = self._in_line(waiter.model)
        if waiter not in line:
            return None
        waited = self._clock() - waiter.since
        return Position(waiter.model, line.index(waiter) + 1, len(line), waited)

    async def _telling(self, waiter: _Waiter, tell: Tell) -> None:
        """Wait until ``waiter`` is let go (or fails), telling its position meanwhile."""
        loop = asyncio.get_running_loop()
        told: tuple[int, int] | None = None
        told_at = loop.time()
        while not waiter.done.done():
            waiter.moved = loop.create_future()  # before reading: no change goes unseen
            where = self.position(waiter)
            if where is not None and (
                (where.place, where.waiting) != told or loop.time() - told_at >= POSITION_EVERY_S
            ):
                await tell(where)
                told, told_at = (where.place, where.waiting), loop.time()
            await asyncio.wait(
                {waiter.done, waiter.moved},
                timeout=POSITION_EVERY_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        waiter.done.result()  # the switch's error, if it failed

    def _moved(self) -> None:
        """The queues changed: every waiter told its position looks again."""
        for w in self._waiters:
            if w.moved is not None and not w.moved.done():
                w.moved.set_result(None)

    def _retry_after(self, model: str) -> float:
        """Seconds until a new waiter of ``model`` would likely be served: a switch per
        model queued before it, each its measured load time."""
        models = {w.model for w in self._waiters} | {model}
        return (
            sum(self.measured_load_s.get(m, DEFAULT_LOAD_S) for m in models) + self._rules().linger
        )

    def view(self) -> View:
        now, active = self._clock(), self._controller.active
        if active != self._resident[0]:
            self._resident = (active, now)
        busy = bool(active is not None and self._gate.inflight({active}))
        queues = {m: q for m, q in self.queues().items() if m != active}
        return View(
            now=now,
            active=active,
            busy=busy,
            last_request=self._last_served(active),
            resident_since=self._resident[1],
            queues=queues,
            measured_load_s=dict(self.measured_load_s),
            measured_replay_s=dict(self.measured_replay_s),
            snapshot_for=frozenset(m for m in queues if self._has_snapshot(m)),
        )

    def _session_for(self, model: str) -> SessionRef | None:
        """The conversation a switch to ``model`` is for: its first waiter's with one."""
        return next((w.session for w in self._in_line(model) if w.session is not None), None)

    def _has_snapshot(self, model: str) -> bool:
        session = self._session_for(model)
        return session is not None and self._snapshot(model, session)

    def admits(self, model: str) -> bool:
        """Whether a new request for ``model``, the loaded one (its ticket counted in
        flight), goes upstream now. Always, while no other model waits; else only within
        the model's slots (its preset's ``np``, else ``[router] parallel``) and behind its
        own waiters, so that a switch for the others drains at most that many generations."""
        if not self._waiters:
            return True
        if any(w.model == model for w in self._waiters):
            return False
        return len(self._gate.inflight({model})) <= self._slots(model)

    def _last_served(self, active: str | None) -> float:
        """When the loaded model last answered a request (else: since it is loaded)."""
        served = None if active is None else self._gate.last_served(active)
        return max(served or 0.0, self._resident[1])

    async def run(self) -> None:
        """Decide, switch, release; until cancelled (the runtime owns this task). Waiters
        still queued when it ends hear that hotmodel is stopping."""
        try:
            await self._loop()
        finally:
            self._fail_all(ShuttingDownError("hotmodel is shutting down"))

    def _fail_all(self, exc: BaseException) -> None:
        self._settle(list(self._waiters), exc)

    def _settle(self, waiters: list[_Waiter], exc: BaseException | None = None) -> None:
        """Take ``waiters`` off the queue: released (``exc`` None), or failed with ``exc``
        (one that gave up meanwhile is only removed)."""
        self._moved()  # those left see their place move up
        for w in waiters:
            self._waiters.remove(w)
            if w.done.done():
                continue
            if exc is None:
                w.done.set_result(None)
            else:
                w.done.set_exception(exc)

    async def _loop(self) -> None:
        while True:
            if self._controller.busy:  # a recovery or someone's switch: decide after it
                await self._sleep_until(None)
                continue
            decision = decide(self.view(), self._rules())
            if decision.target is None:
                self._release_active(limit=True)
                await self._sleep_until(decision.wake_at)
                continue
            await self._switch(decision.target, decision.reason)

    def _release_active(self, limit: bool = False) -> None:
        """Waiters of the loaded model go: all of them after a switch to it (one switch
        admits its whole queue, whoever asked for it), else (``limit``) as many as it has
        free slots while other models wait (the first in line: by priority and wait), all
        when none does."""
        active = self._controller.active
        if active is None:
            return
        mine = self._in_line(active)
        if active != self._released_for:
            self._released_for, limit = active, False  # a new model: its whole queue
        if limit and any(w.model != active for w in self._waiters):
            busy = len(self._gate.inflight({active}))
            mine = mine[: max(0, self._slots(active) - busy)]
        self._settle(mine)

    async def _sleep_until(self, wake_at: float | None) -> None:
        self._changed.clear()
        timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    async def _switch(self, target: str, reason: str) -> None:
        session = self._session_for(target)
        expected_ms = round(cost_s(self.view(), target) * 1000, 1)  # a snapshot saves the replay
        log.info("switching to %s (%s)", target, reason)
        try:
            report = await self._controller.submit(Switch(target, session=session))
        except Exception as exc:  # the loop is shutting down, or a bug: waiters hear it
            self._fail(target, exc)
            return
        report.reason, report.expected_ms = reason, expected_ms
        self._learn(target, report)
        if report.drain_timed_out:
            # nothing changed: generations on the loaded model outlived the drain deadline.
            # The waiters keep their place (each within its own bound); the next decision
            # tries again.
            log.warning("switching to %s must wait: %s", target, report.error)
            await asyncio.sleep(RETRY_AFTER_DRAIN_S)  # the generations run on meanwhile
        elif report.failed:
            error = SwitchFailedError(
                f"switching to {target!r} failed at its {report.failed_phase}", report
            )
            self._fail(target, error)
        else:
            self._release_active()
            for _ in range(_HANDOVER_TURNS):  # the released requests take their tickets
                await asyncio.sleep(0)

    def _learn(self, target: str, report: SwitchReport) -> None:
        if report.failed:
            return
        _ewma(self.measured_load_s, target, report.phases.get("load"))
        restored = (report.snapshot.get("restore") or {}).get("restored")
        if not restored:  # the whole replay: what a snapshot would have saved
            _ewma(self.measured_replay_s, target, report.phases.get("replay"))

    def _fail(self, target: str, exc: BaseException) -> None:
        self._settle([w for w in self._waiters if w.model == target], exc)


def _ewma(learnt: dict[str, float], model: str, ms: float | None) -> None:
    """Fold a measured duration (ms) into ``learnt`` (seconds, a moving average)."""
    if not ms:
        return
    old, new = learnt.get(model), ms / 1000
    learnt[model] = new if old is None else 0.75 * old + 0.25 * new
