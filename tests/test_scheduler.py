"""The scheduler's decision (``control/decide.py``) against a table of cases, and
its queues driven synchronously with a recording controller: no router, no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from hotmodel.api.placement import FORWARDED
from hotmodel.api.queued import EarlyStream
from hotmodel.control.commands import Switch
from hotmodel.control.decide import (
    DEFAULT_LOAD_S,
    DEFAULT_REPLAY_S,
    Decision,
    Rules,
    View,
    Waiting,
    cost_s,
    decide,
)
from hotmodel.control.scheduler import Position, Scheduler
from hotmodel.control.traffic import TrafficGate
from hotmodel.errors import QueueFullError, ShuttingDownError, SwitchBusyError, SwitchFailedError
from hotmodel.sessions.service import SessionRef
from tests.fakes import RULES, Clock, RecordingController


def view(**changes: Any) -> View:
    base: dict[str, Any] = {
        "now": 100.0,
        "active": "a",
        "busy": False,
        "last_request": 90.0,
        "resident_since": 50.0,
        "queues": {},
        "measured_load_s": {},
        "measured_replay_s": {},
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
        view(
            queues={"b": Waiting(1, 95.0), "c": Waiting(1, 97.0)}, measured_load_s={"b": 1, "c": 1}
        ),
        RULES,
        Decision("b", "batch: 1 waiting for b, oldest 5.0 s"),
    ),
    (
        "more waiters count: 4 waiting for c beat 1 a second longer for b",
        view(
            queues={"b": Waiting(1, 96.0), "c": Waiting(4, 97.0)}, measured_load_s={"b": 1, "c": 1}
        ),
        RULES,
        Decision("c", "batch: 4 waiting for c, oldest 3.0 s"),
    ),
    (
        "a cheap load wins when waits are close",
        view(
            queues={"b": Waiting(1, 96.0), "c": Waiting(1, 96.5)},
            measured_load_s={"b": 3, "c": 0.2},
        ),
        RULES,
        Decision("c", "batch: 1 waiting for c, oldest 3.5 s"),
    ),
    (
        "starvation: of two overdue queues the older goes, whatever their size",
        view(busy=True, queues={"b": Waiting(1, 80.0), "c": Waiting(9, 85.0)}),
        RULES,
        Decision("b", "max_wait: 1 waiting for b, oldest 20.0 s"),
    ),
    (
        "priority: a fresh waiter of a higher priority goes before an older one",
        view(queues={"b": Waiting(1, 97.0), "c": Waiting(1, 99.5, priority=1)}),
        RULES,  # c: 0.5 s + 1 point (5 s) beats b: 3 s
        Decision("c", "priority: 1 waiting for c, oldest 0.5 s, priority 1"),
    ),
    (
        "aging: a waiter that has waited a point longer overtakes the higher priority",
        view(queues={"b": Waiting(1, 94.0), "c": Waiting(1, 99.5, priority=1)}),
        RULES,  # b: 6 s beats c: 0.5 s + 5 s
        Decision("b", "priority: 1 waiting for b, oldest 6.0 s"),
    ),
    (
        "aging_seconds is what a point is worth: at 1 s a point, c's point weighs less",
        view(queues={"b": Waiting(1, 97.0), "c": Waiting(1, 99.5, priority=1)}),
        Rules(10.0, 0.5, 0.0, aging=1.0),
        Decision("b", "priority: 1 waiting for b, oldest 3.0 s"),
    ),
    (
        "a negative priority (a batch key) waits behind a fresher default one",
        view(queues={"b": Waiting(1, 96.0, priority=-1), "c": Waiting(1, 99.0)}),
        RULES,  # b: 4 s - 5 s < c: 1 s
        Decision("c", "priority: 1 waiting for c, oldest 1.0 s"),
    ),
    (
        "overdue beats any priority: no waiter starves",
        view(busy=True, queues={"b": Waiting(1, 90.0), "c": Waiting(3, 99.0, priority=100)}),
        RULES,
        Decision("b", "max_wait: 1 waiting for b, oldest 10.0 s"),
    ),
    (
        "a queue's lead waiter counts (a high-priority key that joined late leads it)",
        view(
            queues={"b": Waiting(1, 95.0), "c": Waiting(2, 96.0, priority=2, lead=99.0)},
            measured_load_s={"b": 1, "c": 1},
        ),
        RULES,  # c: 1 s + 10 s + 0.5 beats b: 5 s
        Decision("c", "priority: 2 waiting for c, oldest 4.0 s, priority 2"),
    ),
    (
        "a KV snapshot of the waiting conversation saves the replay: that model goes",
        view(
            queues={"b": Waiting(1, 96.0), "c": Waiting(1, 96.5)},
            measured_load_s={"b": 1, "c": 1},
            measured_replay_s={"b": 2, "c": 2},
            snapshot_for=frozenset({"c"}),
        ),
        RULES,  # c: 3.5 - 1 beats b: 4 - 1 - 2
        Decision("c", "batch: 1 waiting for c, oldest 3.5 s"),
    ),
    (
        "... and without it the older waiter goes",
        view(
            queues={"b": Waiting(1, 96.0), "c": Waiting(1, 96.5)},
            measured_load_s={"b": 1, "c": 1},
            measured_replay_s={"b": 2, "c": 2},
        ),
        RULES,
        Decision("b", "batch: 1 waiting for b, oldest 4.0 s"),
    ),
]


def test_the_expected_cost_is_the_load_plus_a_replay_a_snapshot_saves() -> None:
    seen = view(
        measured_load_s={"b": 2.0}, measured_replay_s={"b": 1.5}, snapshot_for=frozenset({"c"})
    )
    assert cost_s(seen, "b") == 3.5
    assert cost_s(seen, "c") == DEFAULT_LOAD_S  # never measured, and its replay saved
    assert cost_s(seen, "d") == DEFAULT_LOAD_S + DEFAULT_REPLAY_S


@pytest.mark.parametrize(("name", "seen", "rules", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decide(name: str, seen: View, rules: Rules, expected: Decision) -> None:
    assert decide(seen, rules) == expected


def scheduler(
    controller: RecordingController,
    clock: Clock,
    max_queue: int = 8,
    *,
    max_wait: float = 10.0,
    linger: float = 0.0,
    gate: TrafficGate | None = None,
    **hooks: Any,
) -> Scheduler:
    """A scheduler on ``controller`` and the hand-moved ``clock``; by default it switches
    as soon as the loaded model is idle (no linger: the clock moves only by hand).
    ``hooks``: the Scheduler's ``slots``, ``priority``, ``snapshot``."""
    return Scheduler(
        controller,  # type: ignore[arg-type]
        gate or TrafficGate(),
        lambda: Rules(max_wait=max_wait, linger=linger, min_resident=0.0),
        lambda: max_queue,
        clock,
        **hooks,
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
            "b": {"waiting": 3, "oldest_wait_s": 0.0, "lead_priority": 0},
            "c": {"waiting": 1, "oldest_wait_s": 0.0, "lead_priority": 0},
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


def test_the_switch_command_carries_the_conversation_it_is_for() -> None:
    """The session to restore or replay travels in the Switch itself: no shared state
    that a later request could overwrite while the switch runs."""

    async def scenario() -> list[Any]:
        controller, clock = RecordingController(), Clock()
        sched = scheduler(controller, clock)
        mine = SessionRef("chat-1", None, owner="k1")
        waits = [
            asyncio.create_task(sched.wait_for("b", None, 60)),
            asyncio.create_task(sched.wait_for("b", mine, 60)),
            asyncio.create_task(sched.wait_for("b", SessionRef("chat-2", None), 60)),
        ]
        await _settle()
        clock.now += 1
        loop = asyncio.create_task(sched.run())
        await asyncio.gather(*waits)
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        return controller.commands

    commands = asyncio.run(scenario())
    assert commands == [Switch("b")]
    assert commands[0].session == SessionRef("chat-1", None, owner="k1")  # the oldest's


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
    assert sched.measured_load_s == {"b": 0.4}
    report = controller.reports[0]
    assert report.reason == "batch: 1 waiting for b, oldest 1.0 s"
    assert report.expected_ms == 1500.0  # nothing measured yet: the default load and replay
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
        sched = scheduler(controller, clock, linger=0.5, gate=gate, slots=lambda model: 1)
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
        sched = scheduler(controller, clock, max_wait=60.0, linger=0.5)
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


async def _stop(loop: asyncio.Task[None]) -> None:
    loop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop


def test_the_higher_priority_queue_is_switched_to_first_and_a_snapshot_lowers_the_cost() -> None:
    async def scenario() -> tuple[list[str], list[float | None]]:
        controller, clock = RecordingController(), Clock()
        session = SessionRef("s1", None, owner="k")
        sched = scheduler(
            controller,
            clock,
            priority=lambda model: {"c": 1}.get(model, 0),  # the preset's
            snapshot=lambda model, s: (model, s.id) == ("c", "s1"),
        )
        older = asyncio.create_task(sched.wait_for("b", None, 60))
        await _settle()
        clock.now += 2
        newer = asyncio.create_task(sched.wait_for("c", session, 60))
        await _settle()
        assert sched.status()["c"]["lead_priority"] == 1
        clock.now += 1
        loop = asyncio.create_task(sched.run())
        await asyncio.gather(older, newer)
        await _stop(loop)
        return controller.asked, [r.expected_ms for r in controller.reports]

    asked, expected = asyncio.run(scenario())
    assert asked == ["c", "b"]  # c: 1 s + a point (5 s) beats b: 3 s
    assert expected == [1000.0, 1500.0]  # c: its load alone (a snapshot); b: load and replay


def test_a_key_priority_leads_its_queue_and_a_client_that_leaves_takes_it_along() -> None:
    async def scenario() -> None:
        controller, clock = RecordingController(), Clock()
        sched = scheduler(controller, clock)
        plain = asyncio.create_task(sched.wait_for("b", None, 60))
        await _settle()
        clock.now += 1
        urgent = asyncio.create_task(sched.wait_for("b", None, 60, priority=3))
        await _settle()
        assert sched.queues()["b"] == Waiting(2, clock.now - 1, priority=3, lead=clock.now)
        urgent.cancel()  # its client left
        await _settle()
        assert sched.queues()["b"] == Waiting(1, clock.now - 1, priority=0, lead=clock.now - 1)
        plain.cancel()
        await _settle()
        assert sched.queues() == {}

    asyncio.run(scenario())


def test_within_a_queue_the_slot_that_comes_free_goes_to_the_higher_priority() -> None:
    async def scenario() -> None:
        controller, clock = RecordingController(), Clock()
        gate = TrafficGate()
        sched = scheduler(
            controller, clock, max_wait=60.0, linger=60.0, gate=gate, slots=lambda model: 1
        )
        other = asyncio.create_task(sched.wait_for("b", None, 120))  # keeps the slot bound
        async with gate.admit(1) as busy:
            busy.model = "a"
            low = asyncio.create_task(sched.wait_for("a", None, 120))
            await _settle()
            clock.now += 1
            high = asyncio.create_task(sched.wait_for("a", None, 120, priority=1))
            loop = asyncio.create_task(sched.run())
            await _settle()
            assert not low.done() and not high.done()  # a's one slot is taken
        sched.poke()
        await _settle()
        assert high.done() and not low.done()  # the slot went to the higher priority
        assert controller.asked == []  # the loaded model lingers: no switch
        for task in (low, other):
            task.cancel()
        await _stop(loop)

    asyncio.run(scenario())


def test_a_requeued_waiter_keeps_its_place() -> None:
    async def scenario() -> None:
        controller, clock = RecordingController(), Clock()
        sched = scheduler(controller, clock)
        controller.undrained.add("b")
        waiter = asyncio.create_task(sched.wait_for("b", None, 60))
        await _settle()
        clock.now += 1
        loop = asyncio.create_task(sched.run())
        await _settle()
        assert controller.asked == ["b"] and not waiter.done()  # the drain timed out
        clock.now += 3
        assert sched.status()["b"]["oldest_wait_s"] == 4.0  # still its first since
        # a request that waits again (another switch came first) keeps its since too
        again = asyncio.create_task(sched.wait_for("c", None, 60, since=clock.now - 7))
        await _settle()
        assert sched.status()["c"]["oldest_wait_s"] == 7.0
        for task in (waiter, again):
            task.cancel()
        await _stop(loop)

    asyncio.run(scenario())


def test_a_waiter_is_told_its_place_when_it_moves_up() -> None:
    async def scenario() -> list[str]:
        controller, clock = RecordingController(), Clock()
        sched = scheduler(controller, clock)
        told: list[str] = []

        async def tell(where: Position) -> None:
            told.append(str(where))

        first = asyncio.create_task(sched.wait_for("b", None, 60))
        await _settle()
        clock.now += 1.5
        second = asyncio.create_task(sched.wait_for("b", None, 60, tell=tell))
        await _settle()
        first.cancel()  # its client left: the second moves up
        await _settle()
        clock.now += 1
        loop = asyncio.create_task(sched.run())
        await second  # released by the switch: the wait ends
        await _stop(loop)
        return told

    assert asyncio.run(scenario()) == [
        "queued 2 of 2 for b, waited 0.0 s",
        "queued 1 of 1 for b, waited 0.0 s",
    ]


def test_an_early_stream_ends_with_an_error_event_instead_of_a_second_head() -> None:
    async def scenario() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        early = EarlyStream(send, {"x-session-id": "s"}, {"type": "http"})
        await early.tell(Position("b", 1, 3, 2.0))
        await early.send({"type": "http.response.start", "status": 503, "headers": []})
        await early.send({"type": "http.response.body", "body": b'{"error": {"code": "x"}}'})
        return sent

    start, comment, end = asyncio.run(scenario())
    assert start["status"] == 200 and (b"x-session-id", b"s") in start["headers"]
    assert comment["body"] == b": queued 1 of 3 for b, waited 2.0 s\n\n"
    assert end == {
        "type": "http.response.body",
        "body": b'data: {"error": {"code": "x"}}\n\n',
        "more_body": False,
    }


def test_a_request_a_peer_forwarded_waits_without_an_early_head() -> None:
    """In a cluster the forwarding node may still place it elsewhere if this one dies
    before answering: no head goes out while it waits, only the answer's own."""

    async def scenario() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        forwarded = {"type": "http", "state": {FORWARDED: "node-b"}}
        early = EarlyStream(send, {}, forwarded)
        await early.tell(Position("b", 1, 3, 2.0))
        assert sent == []
        await early.send({"type": "http.response.start", "status": 503, "headers": []})
        return sent

    assert [m["status"] for m in asyncio.run(scenario())] == [503]  # as a plain answer
