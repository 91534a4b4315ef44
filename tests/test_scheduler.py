"""The scheduler's decision (``control/decide.py``) against a table of cases, and
its queues driven synchronously with a recording controller: no router, no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hotmodel.control.decide import Decision, Rules, View, Waiting, decide
from hotmodel.control.report import Outcome, SwitchReport
from hotmodel.control.scheduler import Scheduler
from hotmodel.control.traffic import TrafficGate
from hotmodel.errors import QueueFullError, ShuttingDownError, SwitchBusyError, SwitchFailedError

RULES = Rules(max_wait=10.0, linger=0.5, min_resident=0.0)


def view(**changes: Any) -> View:
    base: dict[str, Any] = {
        "now": 100.0,
        "active": "a",
        "busy": False,
        "last_request": 90.0,
        "resident_since": 50.0,
        "queues": {},
        "load_s": {},
    }
    return View(**{**base, **changes})


CASES: list[tuple[str, View, Rules, Decision]] = [
    ("nobody waits", view(), RULES, Decision(None)),
    (
        "no model loaded: at once",
        view(active=None, queues={"b": Waiting(1, 99.9)}),
        RULES,
        Decision("b", "no model loaded: 1 waiting for b, oldest 0.1 s"),
    ),
    (
        "the loaded model is busy: wait, wake at the fairness bound",
        view(busy=True, last_request=99.9, queues={"b": Waiting(2, 95.0)}),
        RULES,
        Decision(None, wake_at=105.0),
    ),
    (
        "the loaded model just answered: its client may come back within the linger",
        view(last_request=99.8, queues={"b": Waiting(1, 99.0)}),
        RULES,
        Decision(None, wake_at=100.3),
    ),
    (
        "the loaded model is idle past the linger: the batch goes",
        view(last_request=99.0, queues={"b": Waiting(3, 98.0)}),
        RULES,
        Decision("b", "batch: 3 waiting for b, oldest 2.0 s"),
    ),
    (
        "fairness: a waiter at max_wait goes even while the loaded model is busy",
        view(busy=True, last_request=100.0, queues={"b": Waiting(1, 90.0)}),
        RULES,
        Decision("b", "max_wait: 1 waiting for b, oldest 10.0 s"),
    ),
    (
        "min_resident keeps a model loaded that just came",
        view(resident_since=99.0, last_request=99.0, queues={"b": Waiting(1, 99.0)}),
        Rules(10.0, 0.5, 5.0),
        Decision(None, wake_at=104.0),
    ),
    (
        "... but not past the fairness bound",
        view(resident_since=99.0, last_request=99.0, queues={"b": Waiting(1, 89.0)}),
        Rules(10.0, 0.5, 30.0),
        Decision("b", "max_wait: 1 waiting for b, oldest 11.0 s"),
    ),
    (
        "the oldest waiter's model first",
        view(queues={"b": Waiting(1, 95.0), "c": Waiting(1, 97.0)}, load_s={"b": 1, "c": 1}),
        RULES,
        Decision("b", "batch: 1 waiting for b, oldest 5.0 s"),
    ),
    (
        "more waiters count: 4 waiting for c beat 1 a second longer for b",
        view(queues={"b": Waiting(1, 96.0), "c": Waiting(4, 97.0)}, load_s={"b": 1, "c": 1}),
        RULES,
        Decision("c", "batch: 4 waiting for c, oldest 3.0 s"),
    ),
    (
        "a cheap load wins when waits are close",
        view(queues={"b": Waiting(1, 96.0), "c": Waiting(1, 96.5)}, load_s={"b": 3, "c": 0.2}),
        RULES,
        Decision("c", "batch: 1 waiting for c, oldest 3.5 s"),
    ),
    (
        "starvation: of two overdue queues the older goes, whatever their size",
        view(busy=True, queues={"b": Waiting(1, 80.0), "c": Waiting(9, 85.0)}),
        RULES,
        Decision("b", "max_wait: 1 waiting for b, oldest 20.0 s"),
    ),
]


@pytest.mark.parametrize(("name", "seen", "rules", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decide(name: str, seen: View, rules: Rules, expected: Decision) -> None:
    assert decide(seen, rules) == expected


class Clock:
    """The scheduler's clock, moved by hand (from the gate's own: monotonic seconds)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


class RecordingController:
    """Records the switches asked for; each ends as the test says."""

    def __init__(self) -> None:
        self.active: str | None = "a"
        self.asked: list[str] = []
        self.fail: set[str] = set()
        self.undrained: set[str] = set()  # switches to these fail at their drain
        self.busy = False  # no command queued or running between switches
        self.reports: list[SwitchReport] = []

    async def submit(self, command: Any) -> SwitchReport:
        self.asked.append(command.target)
        report = SwitchReport(len(self.asked), self.active, command.target, "zero_overlap", "")
        report.phases["load"] = 400.0
        if command.target in self.undrained:
            report.outcome, report.failed_phase, report.error = Outcome.FAILED, "drain", "busy"
        elif command.target in self.fail:
            report.outcome, report.failed_phase, report.error = Outcome.FAILED, "load", "no"
        else:
            report.outcome = Outcome.OK
            self.active = command.target
        self.reports.append(report)
        return report


@contextlib.contextmanager
def no_preference(model: str, session: object) -> Iterator[None]:
    yield


def scheduler(controller: RecordingController, clock: Clock, max_queue: int = 8) -> Scheduler:
    """A scheduler that switches as soon as the loaded model is idle (no linger: the
    clock here moves only by hand)."""
    return Scheduler(
        controller,  # type: ignore[arg-type]
        TrafficGate(),
        lambda: Rules(max_wait=10.0, linger=0.0, min_resident=0.0),
        lambda: max_queue,
        no_preference,
        clock,
    )


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_one_switch_admits_the_whole_queue_and_a_failed_load_fails_only_its_own() -> None:
    async def scenario() -> tuple[list[str], list[BaseException | None]]:
        controller, clock = RecordingController(), Clock()
        sched = scheduler(controller, clock)
        controller.fail.add("c")
        waits = [asyncio.create_task(sched.wait_for(m, None, 60)) for m in "bbbc"]
        await _settle()
        assert sched.status() == {
            "b": {"waiting": 3, "oldest_wait_s": 0.0},
            "c": {"waiting": 1, "oldest_wait_s": 0.0},
        }
        clock.now += 1  # the loaded model has been idle past the linger
        loop = asyncio.create_task(sched.run())
        results = await asyncio.gather(*waits, return_exceptions=True)
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        return controller.asked, results

    asked, results = asyncio.run(scenario())
    assert asked == ["b", "c"]  # three waiters of b, one switch
    assert results[:3] == [None, None, None]
    assert isinstance(results[3], SwitchFailedError)


def test_a_waiter_that_leaves_is_dropped_at_once_and_the_queue_is_bounded() -> None:
    async def scenario() -> None:
        controller, clock = RecordingController(), Clock()
        sched = scheduler(controller, clock, max_queue=2)
        first = asyncio.create_task(sched.wait_for("b", None, 60))
        second = asyncio.create_task(sched.wait_for("b", None, 60))
        await _settle()
        with pytest.raises(QueueFullError) as full:
            await sched.wait_for("c", None, 60)
        assert full.value.retry_after > 0
        first.cancel()  # its client left
        await _settle()
        assert sched.status()["b"]["waiting"] == 1
        with pytest.raises(SwitchBusyError):
            await sched.wait_for("c", None, 0.01)  # room again; bounded by its timeout
        second.cancel()
        await _settle()
        assert sched.status() == {}
        assert controller.asked == []  # nothing ran the loop: no switch was made

    asyncio.run(scenario())


def test_the_measured_load_time_is_learnt_and_the_report_says_why_and_what_was_expected() -> None:
    async def scenario() -> tuple[Scheduler, RecordingController]:
        controller, clock = RecordingController(), Clock()
        sched = scheduler(controller, clock)
        waiter = asyncio.create_task(sched.wait_for("b", None, 60))
        await _settle()
        clock.now += 1
        loop = asyncio.create_task(sched.run())
        await waiter
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        return sched, controller

    sched, controller = asyncio.run(scenario())
    assert sched.load_s == {"b": 0.4}
    report = controller.reports[0]
    assert report.reason == "batch: 1 waiting for b, oldest 1.0 s"
    assert report.expected_ms == 1000.0  # nothing measured yet: the default
    assert report.to_json()["reason"] == report.reason


def test_a_switch_that_cannot_drain_keeps_its_waiters_and_tries_again() -> None:
    async def scenario() -> list[str]:
        controller, clock = RecordingController(), Clock()
        sched = scheduler(controller, clock)
        controller.undrained.add("b")
        waiter = asyncio.create_task(sched.wait_for("b", None, 60))
        await _settle()
        clock.now += 1
        loop = asyncio.create_task(sched.run())
        await _settle()
        assert not waiter.done() and sched.status()["b"]["waiting"] == 1
        controller.undrained.clear()  # the long generation ended
        await waiter  # served by the second try, a second later
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        return controller.asked

    assert asyncio.run(scenario()) == ["b", "b"]


def test_while_others_wait_the_loaded_model_takes_no_more_than_its_slots() -> None:
    async def scenario() -> None:
        controller, clock = RecordingController(), Clock()
        gate = TrafficGate()
        sched = Scheduler(
            controller,  # type: ignore[arg-type]
            gate,
            lambda: Rules(max_wait=10.0, linger=0.5, min_resident=0.0),
            lambda: 8,
            no_preference,
            clock,
            slots=lambda: 1,
        )
        async with gate.admit(1) as first:
            first.model = "a"
            assert sched.admits("a")  # nobody waits for another model: no bound
            async with gate.admit(1) as second:
                second.model = "a"
                assert sched.admits("a")
                other = asyncio.create_task(sched.wait_for("b", None, 60))
                await _settle()
                assert not sched.admits("a")  # b waits: a's slot is taken twice over
        async with gate.admit(1) as third:
            third.model = "a"
            assert sched.admits("a")  # one in flight: within its slot
        queued = asyncio.create_task(sched.wait_for("a", None, 60))
        await _settle()
        async with gate.admit(1) as fourth:
            fourth.model = "a"
            assert not sched.admits("a")  # behind a's own waiter
            loop = asyncio.create_task(sched.run())
            await _settle()
            assert not queued.done()  # its slot is still taken
        sched.poke()
        await _settle()
        await queued  # the slot came free: released, in line
        loop.cancel()
        other.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop

    asyncio.run(scenario())


def test_waiters_hear_of_a_stop_and_other_models_tickets_do_not_hold_the_loaded_one() -> None:
    async def scenario() -> BaseException | None:
        controller, clock = RecordingController(), Clock()
        sched = Scheduler(
            controller,  # type: ignore[arg-type]
            TrafficGate(),
            lambda: Rules(max_wait=60.0, linger=0.5, min_resident=0.0),
            lambda: 8,
            no_preference,
            clock,
        )
        gate = sched._gate
        async with gate.admit(1) as ticket:  # a request for b: its ticket, briefly
            pass
        assert gate.last_served("a") is None  # ... is no activity of the loaded model
        async with gate.admit(1) as ticket:
            ticket.model = "a"
        assert gate.last_served("a") is not None
        waiter = asyncio.create_task(sched.wait_for("b", None, 60))
        loop = asyncio.create_task(sched.run())
        await _settle()
        loop.cancel()  # hotmodel stops
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        (outcome,) = await asyncio.gather(waiter, return_exceptions=True)
        return outcome

    assert isinstance(asyncio.run(scenario()), ShuttingDownError)
