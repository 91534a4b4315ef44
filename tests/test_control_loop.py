"""The control loop (control/controller.py): one command at a time, in order; joining,
shutdown, reloads, recovery and idle unload, on the fakes of tests/fakes.py. Tests wait
on events, never on sleeps.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hotmodel.config import load_config
from hotmodel.control.commands import Recover, Switch, Unload
from hotmodel.control.controller import Controller
from hotmodel.control.plan import Step, plan
from hotmodel.control.report import Outcome, SwitchReport, SwitchState
from hotmodel.control.traffic import TrafficGate
from hotmodel.errors import ShuttingDownError
from hotmodel.sessions.service import SessionRef
from tests.conftest import write_config
from tests.fakes import (
    FakeProcess,
    FakeRouter,
    Phases,
    control,
    fake_engine,
    run,
    switch,
)


def test_a_reload_that_fails_is_taken_back_within_its_own_command(tmp_path: Path) -> None:
    """Found by a hostile pass: the switch back ran as a command of its own, after a
    switch queued meanwhile (undoing it), and the requests held by the failed switch
    were let in with no model (503) before it. The engine's settings change only in
    the loop: the reload's while it runs, the previous ones for the switch back."""
    router = FakeRouter("a", broken=frozenset({"a"}))  # a's new preset does not load
    engine = fake_engine(router)
    old = load_config(write_config(tmp_path / "old", {"a": tmp_path / "a.gguf"}, "a"))
    new = load_config(
        write_config(
            tmp_path / "new",
            {"a": tmp_path / "a.gguf", "b": tmp_path / "b.gguf"},
            "a",
            extra="unload_timeout_seconds = 77",
        )
    )
    seen: list[tuple[bool, float]] = []

    def revert() -> None:
        seen.append((engine.gate.is_open, engine.config.unload_timeout_seconds))
        router.broken.clear()  # the previous preset loads

    async def scenario(c: Controller) -> tuple[SwitchReport | None, SwitchReport]:
        first = asyncio.create_task(c.reconfigure(new, old, "a", revert))
        await asyncio.sleep(0)
        assert c.presets == {"a", "b"}  # a command posted from now on may name b
        queued = c.post(Switch("b"))  # given while the reload ran
        return await first, await queued

    report, later = run(scenario, engine)
    assert report is not None and report.failed
    # the gate stayed closed for the revert, and the previous settings were back
    assert seen == [(False, old.switch.unload_timeout_seconds)]
    assert report.reverted is not None and report.reverted.outcome is Outcome.OK
    assert later.outcome is Outcome.OK and engine.active == "b"  # the queued one ran last
    assert router.calls[-3:] == ["load a", "unload a", "load b"]
    assert engine.gate.is_open


def test_a_reload_changes_the_engine_between_two_runs_never_during_one(tmp_path: Path) -> None:
    router = FakeRouter("a")
    router.load_gate = asyncio.Event()
    engine = fake_engine(router)
    old = load_config(write_config(tmp_path / "old", {"a": tmp_path / "a.gguf"}, "a"))
    extra = "unload_timeout_seconds = 77"
    new = load_config(write_config(tmp_path / "new", {"a": tmp_path / "a.gguf"}, "a", extra=extra))

    async def scenario(c: Controller) -> tuple[float, float, SwitchReport | None]:
        switching = c.post(Switch("b"))
        await router.load_started.wait()
        reloading = asyncio.create_task(c.reconfigure(new, old))
        await asyncio.sleep(0.01)
        during = engine.config.unload_timeout_seconds  # the running switch keeps its own
        assert router.load_gate is not None
        router.load_gate.set()
        await switching
        answer = await reloading
        return during, engine.config.unload_timeout_seconds, answer

    during, after, answer = run(scenario, engine)
    assert during != 77 and after == 77
    assert answer is None  # nothing was loaded again


def test_commands_run_in_order() -> None:
    async def scenario(controller: Controller) -> None:
        rb, rc, ru = await asyncio.gather(
            controller.submit(Switch("b")),
            controller.submit(Switch("c")),
            controller.submit(Unload()),
        )
        assert (rb.from_model, rb.to_model, rc.from_model, rc.to_model) == ("a", "b", "b", "c")
        assert (ru.from_model, ru.to_model, ru.outcome) == ("c", None, Outcome.OK)
        engine = controller.engine
        assert isinstance(engine.lifecycle, FakeRouter)
        assert engine.lifecycle.calls == ["unload a", "load b", "unload b", "load c", "unload c"]
        assert engine.active is None and engine.state is SwitchState.IDLE

    run(scenario, fake_engine(FakeRouter("a")))


def test_a_failing_command_does_not_stop_the_loop() -> None:
    async def scenario(controller: Controller) -> None:
        engine = controller.engine
        real_execute = engine.execute
        calls = 0

        async def flaky(*args: Any, **kwargs: Any) -> SwitchReport:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in a step")
            return await real_execute(*args, **kwargs)

        engine.execute = flaky  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="a bug in a step"):
            await controller.submit(Switch("b"))
        assert not controller.busy
        assert (await controller.submit(Switch("c"))).outcome is Outcome.OK

    run(scenario, fake_engine(FakeRouter("a")))


def test_commands_during_shutdown_are_refused_and_queued_ones_fail() -> None:
    async def main() -> None:
        router = FakeRouter("a")
        router.load_gate = asyncio.Event()  # b's load hangs until shutdown
        engine = fake_engine(router)
        async with control(engine) as controller:
            running = asyncio.create_task(controller.submit(Switch("b")))
            queued = asyncio.create_task(controller.submit(Switch("c")))
            await router.load_started.wait()
        # the control loop was stopped with b loading and c queued
        with pytest.raises(ShuttingDownError):
            await running
        with pytest.raises(ShuttingDownError):
            await queued
        with pytest.raises(ShuttingDownError):
            await controller.submit(Switch("a"))
        assert engine.gate.is_open  # a cancelled switch still reopens the gate

    asyncio.run(main())


def test_a_caller_that_goes_away_does_not_stop_the_switch() -> None:
    async def scenario(controller: Controller) -> None:
        router = controller.engine.lifecycle
        assert isinstance(router, FakeRouter)
        router.load_gate = asyncio.Event()
        caller = asyncio.create_task(controller.submit(Switch("b")))
        await router.load_started.wait()
        caller.cancel()
        router.load_gate.set()
        report = await controller.submit(Switch("b"))  # joins the running one
        assert report.outcome is Outcome.OK and controller.active == "b"

    run(scenario, fake_engine(FakeRouter("a")))


def test_joining_never_reorders_commands() -> None:
    """Switch(b), Switch(c), Switch(b): the last must not join the first (which would
    report b while c stays loaded); only the newest job is joined."""

    async def scenario(controller: Controller) -> None:
        rb1, rc, rb2, rb3 = await asyncio.gather(
            controller.submit(Switch("b")),
            controller.submit(Switch("c")),
            controller.submit(Switch("b")),
            controller.submit(Switch("b")),  # joins the newest: same outcome, nothing behind
        )
        assert controller.active == "b"
        assert rb1 is not rb2 and rb2 is rb3
        assert [r.to_model for r in (rb1, rc, rb2)] == ["b", "c", "b"]
        assert len(controller.engine.history) == 3

    run(scenario, fake_engine(FakeRouter("a")))


def test_held_requests_are_in_flight_before_the_next_command_closes_the_gate() -> None:
    """Opening the gate hands tickets to every held request at once: a switch queued
    behind the one that opened it drains them instead of holding them again."""

    async def scenario(controller: Controller) -> None:
        engine = controller.engine
        router = engine.lifecycle
        assert isinstance(router, FakeRouter)
        router.load_gate = asyncio.Event()
        phases = Phases()
        first = asyncio.create_task(controller.submit(Switch("b"), phases))
        await router.load_started.wait()
        second = asyncio.create_task(controller.submit(Switch("c")))
        seen: list[str | None] = []

        async def request() -> None:
            async with engine.gate.admit(5) as ticket:
                ticket.model = engine.active
                seen.append(ticket.model)

        held = asyncio.create_task(request())
        await asyncio.sleep(0)  # the request is held at the closed gate
        router.load_gate.set()
        await asyncio.gather(first, second, held)
        assert seen == ["b"]  # admitted when b was activated, not after c

    run(scenario, fake_engine(FakeRouter("a"), drain=5.0))


def test_same_target_requests_share_one_switch() -> None:
    async def scenario(controller: Controller) -> None:
        r1, r2, r3 = await asyncio.gather(
            controller.submit(Switch("b")),
            controller.submit(Switch("b")),
            controller.submit(Switch("b", replay_session=False)),
        )
        assert r1 is r2 is r3
        engine = controller.engine
        assert isinstance(engine.lifecycle, FakeRouter)
        assert engine.lifecycle.calls.count("load b") == 1
        assert len(engine.history) == 1

    run(scenario, fake_engine(FakeRouter("a")))


def test_first_load_is_a_command_without_replay() -> None:
    router = FakeRouter(None)
    engine = fake_engine(router, active=None)
    seen: list[str] = []

    async def replay(model: str, session: SessionRef | None = None) -> dict[str, Any]:
        seen.append(model)
        return {}

    engine.replayer = replay
    report = run(lambda c: c.submit(Switch("a", replay_session=False)), engine)
    assert report.outcome is Outcome.OK and engine.active == "a"
    assert router.calls == ["load a"] and seen == []


def test_a_crash_during_a_recovery_gets_a_recovery_of_its_own() -> None:
    async def scenario(controller: Controller) -> None:
        engine = controller.engine
        router = engine.lifecycle
        assert isinstance(router, FakeRouter)
        process = FakeProcess()
        engine.process = process
        router.load_gate = asyncio.Event()
        process.running = False  # the router died
        first = controller.post(Recover("a"))
        await router.load_started.wait()  # past its restart, loading
        process.running = False  # ... and it dies again
        second = controller.post(Recover("a"))
        assert second is not first  # not joined: the running one cannot see this crash
        router.load_gate.set()
        await asyncio.gather(first, second)
        assert process.restarts == 2 and engine.active == "a"

    run(scenario, fake_engine(FakeRouter(None)))  # the crash took the model: it is loaded again


def test_a_switch_on_a_dead_router_starts_it_first() -> None:
    router = FakeRouter("a")
    engine = fake_engine(router)
    process = FakeProcess()
    process.running = False
    engine.process = process
    report = switch(engine, "b")
    assert report.outcome is Outcome.OK and report.policy == "recover"
    assert process.restarts == 1 and router.calls == ["load b"]  # nothing left to unload


def test_only_the_recovery_releases_requests_held_for_it() -> None:
    gate = TrafficGate()
    gate.close(for_recovery=True)  # the watchdog: a crash, a recovery is queued
    gate.open()  # a switch that failed because of the crash ends
    assert not gate.is_open
    gate.begin_recovery()
    assert not gate.is_open
    gate.open()  # the recovery ends
    assert gate.is_open


def test_plans_with_a_router_restart_for_reloaded_presets() -> None:
    zero = plan("zero_overlap", "a", "b", restart=True)
    assert zero.index(Step.RESTART) == zero.index(Step.SETTLE) + 1  # no model loaded then
    assert zero.index(Step.RESTART) < zero.index(Step.LOAD)
    assert plan("zero_overlap", None, "b", restart=True)[:3] == (
        Step.CHECK,
        Step.RESTART,
        Step.LOAD,
    )
    assert Step.RESTART not in plan("overlap", "a", "b", restart=True)  # never a free moment


def test_a_stale_router_restarts_mid_switch_even_under_overlap() -> None:
    router = FakeRouter("a")
    engine = fake_engine(router, policy="overlap")
    process = FakeProcess()
    process.stale = True  # a reload changed the presets
    engine.process = process
    report = switch(engine, "b")
    assert report.outcome is Outcome.OK and process.restarts == 1
    assert router.calls == ["unload a", "load b"]  # zero_overlap: the router had no model


def test_idle_unload_parks_the_model_unless_a_request_came() -> None:
    async def scenario(controller: Controller) -> None:
        engine = controller.engine
        busy = await controller.submit(Unload(idle_after=3600))  # the gate saw activity now
        assert busy.outcome is Outcome.SKIPPED and engine.active == "a"
        idle = await controller.submit(Unload(idle_after=0))
        assert idle.outcome is Outcome.OK and idle.policy == "idle_unload"
        assert engine.active is None and engine.parked == "a"
        await controller.submit(Switch("a"))
        assert engine.active == "a" and engine.parked is None

    run(scenario, fake_engine(FakeRouter("a")))


def test_a_manual_unload_parks_nothing() -> None:
    async def scenario(controller: Controller) -> None:
        await controller.submit(Unload())
        assert controller.engine.active is None and controller.engine.parked is None

    run(scenario, fake_engine(FakeRouter("a")))
