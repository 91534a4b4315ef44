"""The scheduler's decision: when to switch, and to which model (pure, no I/O, no clock of
its own: the table of cases is in ``tests/test_scheduler.py``).

:func:`decide` reads a :class:`View` (the loaded model's traffic and the queues of the
others, as the scheduler saw them at ``now``) and the ``[switch]`` :class:`Rules`, and
says switch to this model now and why, or not now and when to look again.

Which model: a waiter past ``max_wait`` goes first, whatever else (the oldest such).
Else the queue with the highest score, in seconds: its lead waiter's wait plus its
priority (the preset's plus its API key's) at ``aging`` seconds a point (so a waiter
gains a point per ``aging`` seconds waited: a low priority waits longer, never
forever), plus :data:`BATCH_BONUS_S` per further waiter, minus what the switch costs
(:func:`cost_s`: the measured load, and the replay unless a KV snapshot of the
waiting conversation saves it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

BATCH_BONUS_S = 0.5  # each waiter beyond the first counts as this much more waiting
DEFAULT_LOAD_S = 1.0  # a model whose load was never measured
# a model whose replay was never measured (a KV snapshot still counts for this much)
DEFAULT_REPLAY_S = 0.5


@dataclass(frozen=True, slots=True)
class Rules:
    """The ``[switch]`` settings the decision reads."""

    max_wait: float
    linger: float
    min_resident: float
    aging: float = 5.0  # seconds of waiting one priority point is worth


@dataclass(frozen=True, slots=True)
class Waiting:
    """One model's queue, as the decision sees it."""

    count: int
    oldest: float  # when its oldest waiter joined (clock seconds)
    # its lead waiter (the first it would let go, by priority and wait): its priority,
    # and when it joined (None: it is the oldest)
    priority: int = 0
    lead: float | None = None

    def score(self, now: float, aging: float) -> float:
        """The lead waiter's wait plus its priority, in seconds."""
        since = self.oldest if self.lead is None else self.lead
        return (now - since) + aging * self.priority


@dataclass(frozen=True, slots=True)
class View:
    """What the decision reads: the loaded model's traffic and the queues."""

    now: float
    active: str | None
    busy: bool  # a request on the loaded model is in flight
    last_request: float  # when a request on it last started or ended
    resident_since: float  # when it became the loaded model
    queues: Mapping[str, Waiting]  # models other than the loaded one, with waiters
    measured_load_s: Mapping[str, float] = field(default_factory=dict)  # seconds, per model
    measured_replay_s: Mapping[str, float] = field(default_factory=dict)  # seconds, per model
    # models for which the session the switch would be for has a KV snapshot
    snapshot_for: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    target: str | None  # switch to this model now (None: not now)
    reason: str = ""
    wake_at: float | None = None  # decide again then, if nothing happens before


def decide(view: View, rules: Rules) -> Decision:
    """When to switch and to which model (pure: the table of cases is in the tests)."""
    if not view.queues:
        return Decision(None)
    now = view.now
    overdue = {m: q for m, q in view.queues.items() if now - q.oldest >= rules.max_wait}
    if overdue:
        target = min(overdue, key=lambda m: (overdue[m].oldest, m))
        return Decision(target, "max_wait: " + _describe(target, view.queues[target], now))
    target = max(view.queues, key=lambda m: (_urgency(view, rules, m), m))
    queue = view.queues[target]
    if view.active is None:
        return Decision(target, "no model loaded: " + _describe(target, queue, now))
    fair_at = min(q.oldest for q in view.queues.values()) + rules.max_wait
    if view.busy:
        return Decision(None, wake_at=fair_at)
    free_at = max(view.last_request + rules.linger, view.resident_since + rules.min_resident)
    if now >= free_at:
        ranked = any(q.priority for q in view.queues.values())
        why = "priority: " if ranked else "batch: "
        return Decision(target, why + _describe(target, queue, now))
    return Decision(None, wake_at=min(free_at, fair_at))


def cost_s(view: View, model: str) -> float:
    """What switching to ``model`` is expected to cost: its measured load, and its replay
    unless the conversation it is for has a KV snapshot (the restore, a file read, is
    counted as nothing)."""
    load = view.measured_load_s.get(model, DEFAULT_LOAD_S)
    if model in view.snapshot_for:
        return load
    return load + view.measured_replay_s.get(model, DEFAULT_REPLAY_S)


def _urgency(view: View, rules: Rules, model: str) -> float:
    queue = view.queues[model]
    batch = BATCH_BONUS_S * (queue.count - 1)
    return queue.score(view.now, rules.aging) + batch - cost_s(view, model)


def _describe(model: str, queue: Waiting, now: float) -> str:
    text = f"{queue.count} waiting for {model}, oldest {now - queue.oldest:.1f} s"
    return text + (f", priority {queue.priority}" if queue.priority else "")
