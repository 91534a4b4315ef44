"""The switch engine, driven through the real control loop on fakes (tests/fakes.py): its
plans, zero overlap and overlap, GPU settle, drain, the traffic gate, rollback.

The router and the GPU are fakes here (the real ones are in test_switch_real.py); the
traffic gate is the real one (it is pure asyncio). Tests wait on events (a phase started,
a load began), never on sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import anyio
import pytest

from hotmodel.control.commands import Switch, Unload
from hotmodel.control.controller import Controller
from hotmodel.control.plan import Step, plan
from hotmodel.control.report import Outcome, SwitchState
from hotmodel.errors import (
    ConfigError,
    ModelLoadError,
    ModelNotFoundError,
    SwitchBusyError,
)
from hotmodel.sessions.service import SessionRef
from tests.fakes import (
    FakeGpu,
    FakeRouter,
    Phases,
    fake_engine,
    run,
    switch,
)


def test_plans() -> None:
    assert plan("zero_overlap", "a", "b") == (
        Step.CHECK,
        Step.DRAIN,
        Step.UNLOAD,
        Step.SETTLE,
        Step.LOAD,
        Step.ACTIVATE,
        Step.REPLAY,
    )
    assert plan("overlap", "a", "b") == (
        Step.CHECK,
        Step.LOAD,
        Step.REPLAY,
        Step.ACTIVATE,
        Step.DRAIN,
        Step.UNLOAD,
    )
    assert plan("zero_overlap", None, "b") == (Step.CHECK, Step.LOAD, Step.ACTIVATE, Step.REPLAY)
    assert plan("overlap", "a", None) == (Step.DRAIN, Step.UNLOAD, Step.SETTLE, Step.ACTIVATE)
    assert plan("zero_overlap", None, None) == ()


def test_zero_overlap_unloads_before_loading() -> None:
    router = FakeRouter("a")
    engine = fake_engine(router)
    phases = Phases()
    report = switch(engine, "b", phases)
    assert router.calls == ["unload a", "load b"]
    assert report.outcome is Outcome.OK
    assert (report.from_model, report.to_model, report.active_after) == ("a", "b", "b")
    assert engine.active == "b"
    assert engine.state is SwitchState.IDLE
    assert set(report.phases) == {"drain", "unload", "load"}  # settle/replay were skipped
    assert report.to_json()["gpu"] == {
        "before_unload": None,
        "after_unload": None,
        "after_settle": None,
        "after_load": None,
    }
    assert phases.pairs() == [
        ("check", "started"),
        ("check", "skipped"),
        ("drain", "started"),
        ("drain", "done"),
        ("unload", "started"),
        ("unload", "done"),
        ("settle", "started"),
        ("settle", "skipped"),
        ("load", "started"),
        ("load", "done"),
        ("activate", "started"),
        ("activate", "done"),
        ("replay", "started"),
        ("replay", "skipped"),
    ]
    assert list(engine.history) == [report]


def test_gpu_snapshots_and_settle() -> None:
    # before_unload 8000, after_unload 900, then falling to 400 and steady: settled.
    router = FakeRouter("a")
    engine = fake_engine(router, settle_tolerance_mib=16)
    engine.gpu = FakeGpu([8000, 900, 600, 400, 400, 6000])
    report = switch(engine, "b")
    gpu = report.to_json()["gpu"]
    used = {k: v["used_mib"] if v else None for k, v in gpu.items()}
    assert used == {
        "before_unload": 8000,
        "after_unload": 900,
        "after_settle": 400,
        "after_load": 6000,
    }
    assert gpu["after_load"]["devices"][0]["name"] == "Fake GPU"
    assert "settle" in report.phases


def test_settle_stops_at_the_baseline_at_once() -> None:
    gpu = FakeGpu([8000, 310, 6000])
    engine = fake_engine(FakeRouter("a"), settle_tolerance_mib=16)
    engine.gpu, engine.baseline_mib = gpu, 300
    report = switch(engine, "b")
    assert report.gpu.after_settle is not None and report.gpu.after_settle.used_mib == 310
    assert gpu.taken == 3  # no settle polling needed


def test_settle_gives_up_at_its_deadline_and_goes_on() -> None:
    engine = fake_engine(FakeRouter("a"), settle_timeout_seconds=0.3, settle_tolerance_mib=16)
    engine.gpu = FakeGpu([8000, 7990])  # memory never falls (held by another process)
    phases = Phases()
    report = switch(engine, "b", phases)
    assert report.outcome is Outcome.OK
    settle_done = [e for e in phases.events if e.phase == "settle" and e.status.value == "done"]
    assert settle_done[0].detail is not None
    assert "still at 7990 MiB" in settle_done[0].detail
    assert "[switch] settle_timeout_seconds" in settle_done[0].detail
    assert engine.gpu.taken > 3  # it read on until its deadline, then went on


def test_without_device_memory_the_leaving_model_exits_while_the_next_loads() -> None:
    router = FakeRouter("a")
    engine = fake_engine(router)
    engine.exit_in_background = True  # a CPU-only llama-server: nothing to settle
    phases = Phases()
    report = switch(engine, "b", phases)
    assert report.outcome is Outcome.OK and engine.active == "b"
    assert router.calls == ["unload a (background)", "load b"]
    assert engine.lifecycle.exiting == {"a"}
    assert ("unload", "done", "its process exits while the next model loads") in [
        (e.phase, e.status.value, e.detail) for e in phases.events
    ]
    # the next command starts once it is gone (a loads while b exits)
    assert switch(engine, "a").outcome is Outcome.OK
    assert router.calls[2:] == ["exited a", "unload b (background)", "load a"]
    # an unload to no model waits as before: nothing loads next
    assert run(lambda c: c.submit(Unload()), engine).outcome is Outcome.OK
    assert router.calls[5:] == ["exited b", "unload a"]
    assert router.status["a"] == "unloaded"
    # [switch] background_exit = false (two models' RAM would not fit): it is waited for
    engine.config = dataclasses.replace(engine.config, background_exit=False)
    assert switch(engine, "b").outcome is Outcome.OK and switch(engine, "c").outcome is Outcome.OK
    assert router.calls[7:] == ["load b", "unload b", "load c"]


def test_a_failed_load_after_a_background_exit_rolls_back_after_that_exit() -> None:
    router = FakeRouter("a", broken=frozenset({"b"}))
    engine = fake_engine(router)
    engine.exit_in_background = True
    report = switch(engine, "b")
    assert report.outcome is Outcome.FAILED and report.rolled_back is True
    assert engine.active == "a" and router.status["a"] == "loaded"
    assert router.calls == ["unload a (background)", "load b", "unload b", "exited a", "load a"]


def test_failed_load_rolls_back_to_the_previous_model() -> None:
    router = FakeRouter("a", broken=frozenset({"b"}))
    engine = fake_engine(router)
    report = switch(engine, "b")
    assert report.outcome is Outcome.FAILED
    assert report.error == "model 'b' failed to load (exit code 1)"
    assert report.log_tail == "llama log line"
    assert report.rolled_back is True
    assert report.active_after == "a" and engine.active == "a"
    assert engine.state is SwitchState.IDLE
    # the rollback decides from what it did, not from a read: b's load was attempted,
    # so b is unloaded (a no-op here), and a's unload happened, so a is loaded again
    assert router.calls == ["unload a", "load b", "unload b", "load a"]
    assert "rollback" in report.phases
    assert engine.gate.is_open


def test_failed_rollback_leaves_no_model_and_says_so() -> None:
    router = FakeRouter("a", broken=frozenset({"a", "b"}))
    engine = fake_engine(router)
    report = switch(engine, "b")
    assert report.outcome is Outcome.FAILED
    assert report.rolled_back is False
    assert engine.active is None and report.active_after is None
    assert engine.state is SwitchState.FAILED
    assert "rollback to 'a' failed: model 'a' failed to load" in (report.error or "")
    # the next switch starts from nothing: it only loads
    router.broken.clear()
    again = switch(engine, "c")
    assert again.outcome is Outcome.OK and engine.active == "c"
    assert router.calls[-1:] == ["load c"]


def test_timed_out_load_is_unloaded_before_the_rollback() -> None:
    router = FakeRouter("a")
    original = router.load

    async def never_loaded(model: str, timeout: float) -> bool:
        if model == "b":
            router.calls.append("load b")
            router.status[model] = "loading"  # still loading when the deadline hit
            raise ModelLoadError("model 'b' did not reach 'loaded' within 1s")
        return await original(model, timeout)

    router.load = never_loaded  # type: ignore[method-assign]
    report = switch(fake_engine(router), "b")
    assert report.outcome is Outcome.FAILED and report.rolled_back
    # b was still `loading`: it must go before a comes back (models_max = 1)
    assert router.calls[2:] == ["unload b", "load a"]
    assert router.status == {"a": "loaded", "b": "unloaded", "c": "unloaded"}


def test_overall_switch_deadline_rolls_back() -> None:
    router = FakeRouter("a")
    router.load_gate = asyncio.Event()  # b's load never ends
    original = router.load

    async def load(model: str, timeout: float) -> bool:
        if model == "a":
            router.load_gate = None
        return await original(model, timeout)

    router.load = load  # type: ignore[method-assign]
    report = switch(fake_engine(router, switch_timeout_seconds=0.2), "b")
    assert report.outcome is Outcome.FAILED
    assert "within 0.2s ([switch] switch_timeout_seconds)" in (report.error or "")
    assert report.active_after == "a"
    assert router.calls == ["unload a", "load b", "unload b", "load a"]


def test_drain_waits_for_in_flight_requests_before_unloading() -> None:
    async def scenario(controller: Controller) -> list[str]:
        engine = controller.engine
        router = engine.lifecycle
        assert isinstance(router, FakeRouter)
        phases = Phases()
        async with engine.gate.admit(1) as ticket:
            ticket.model = "a"
            switching = asyncio.create_task(controller.submit(Switch("b"), phases))
            await phases.reached("drain")
            assert engine.state is SwitchState.DRAINING
            assert router.calls == []  # nothing unloaded while a generation runs
            assert not engine.gate.is_open
            router.calls.append("request done")
        report = await switching
        assert report.drained == 1
        return router.calls

    engine = fake_engine(FakeRouter("a"), drain=5.0)
    assert run(scenario, engine) == ["request done", "unload a", "load b"]


def test_drain_timeout_fails_the_switch_and_changes_nothing() -> None:
    async def scenario(controller: Controller) -> None:
        engine = controller.engine
        async with engine.gate.admit(1) as ticket:
            ticket.model = "a"
            report = await controller.submit(Switch("b"))
        assert report.outcome is Outcome.FAILED
        assert "1 generation(s) on 'a' still running after 0.2s" in (report.error or "")
        assert "[server] switch_drain_timeout_seconds" in (report.error or "")
        assert isinstance(engine.lifecycle, FakeRouter) and engine.lifecycle.calls == []
        assert engine.active == "a" and engine.gate.is_open
        assert report.rolled_back is False

    run(scenario, fake_engine(FakeRouter("a")))


def test_drain_timeout_can_cancel_the_requests() -> None:
    async def scenario(controller: Controller) -> None:
        gate = controller.engine.gate
        held = asyncio.Event()
        reason: list[str | None] = []

        async def request() -> None:  # a request whose upstream I/O runs in the ticket's scope
            async with gate.admit(1) as ticket:
                ticket.model = "a"
                with anyio.CancelScope() as scope:
                    ticket.bind(scope)
                    held.set()
                    await asyncio.Event().wait()  # a generation that never ends by itself
                reason.append(ticket.cancel_reason)

        req = asyncio.create_task(request())
        await held.wait()
        report = await controller.submit(Switch("b"))
        await req
        assert report.outcome is Outcome.OK and report.cancelled == 1
        assert reason == ["cancelled: switching 'a' -> 'b'"]
        assert gate.inflight() == []

    run(scenario, fake_engine(FakeRouter("a"), drain_timeout_action="cancel"))


def test_requests_wait_at_the_gate_and_are_admitted_at_activation() -> None:
    async def scenario(controller: Controller) -> None:
        engine = controller.engine
        router = engine.lifecycle
        assert isinstance(router, FakeRouter)
        router.load_gate = asyncio.Event()
        replaying = asyncio.Event()
        release_replay = asyncio.Event()

        async def slow_replay(model: str, session: SessionRef | None) -> dict[str, Any]:
            replaying.set()
            await release_replay.wait()
            return {"prompt_tokens": 1}

        engine.replayer = slow_replay
        switching = asyncio.create_task(controller.submit(Switch("b")))
        await router.load_started.wait()
        assert controller.state is SwitchState.LOADING
        with pytest.raises(SwitchBusyError, match="a model switch is in progress"):
            async with engine.gate.admit(0.01):
                pass
        admitted = asyncio.Event()

        async def request() -> str | None:
            async with engine.gate.admit(5) as ticket:
                admitted.set()
                ticket.model = engine.active
                return ticket.model

        waiting = asyncio.create_task(request())
        router.load_gate.set()
        await replaying.wait()
        # the target is active: the held request is admitted while the replay still runs
        assert await waiting == "b"
        assert engine.state is SwitchState.REPLAYING and not switching.done()
        release_replay.set()
        assert (await switching).outcome is Outcome.OK

    run(scenario, fake_engine(FakeRouter("a")))


def test_overlap_loads_first_and_never_closes_the_gate() -> None:
    router = FakeRouter("a")
    engine = fake_engine(router, policy="overlap")
    closed_seen = []
    original = router.load

    async def watch(model: str, timeout: float) -> bool:
        closed_seen.append(not engine.gate.is_open)
        return await original(model, timeout)

    router.load = watch  # type: ignore[method-assign]
    report = switch(engine, "b")
    assert report.outcome is Outcome.OK
    assert router.calls == ["load b", "unload a"]
    assert closed_seen == [False]


def test_overlap_failed_load_keeps_the_old_model_active() -> None:
    router = FakeRouter("a", broken=frozenset({"b"}))
    engine = fake_engine(router, policy="overlap")
    report = switch(engine, "b")
    assert report.outcome is Outcome.FAILED
    assert report.rolled_back is False  # nothing to roll back: a never left
    assert engine.active == "a"
    assert "unload a" not in router.calls


def test_already_active_is_a_no_op() -> None:
    router = FakeRouter("a")
    engine = fake_engine(router)
    report = switch(engine, "a")
    assert report.outcome is Outcome.ALREADY_ACTIVE
    assert router.calls == []
    assert not engine.history  # kept out of GET /admin/switches: no-ops would push switches out


def test_unknown_target() -> None:
    with pytest.raises(ModelNotFoundError, match="'zzz' is not a preset"):
        switch(fake_engine(FakeRouter("a")), "zzz")


def test_replay_hook_runs_after_the_load() -> None:
    router = FakeRouter("a")
    engine = fake_engine(router)
    seen: list[tuple[str, list[str], str | None]] = []

    async def replay(model: str, session: SessionRef | None = None) -> dict[str, Any]:
        seen.append((model, list(router.calls), engine.active))
        return {"prompt_n": 42}

    engine.replayer = replay
    report = switch(engine, "b")
    assert seen == [("b", ["unload a", "load b"], "b")]  # after activation
    assert report.replay == {"prompt_n": 42}
    assert "replay" in report.phases


def test_a_target_that_fails_its_check_changes_nothing() -> None:
    router = FakeRouter("a")
    engine = fake_engine(router)

    def preflight(target: str) -> None:
        raise ConfigError("models.ini", "model file not found: /x.gguf", section=target)

    engine.preflight = preflight
    phases = Phases()
    report = switch(engine, "b", phases)
    assert report.outcome is Outcome.FAILED and report.rolled_back is False
    assert "model file not found" in (report.error or "")
    assert "nothing was changed" in (report.error or "")
    assert router.calls == [] and engine.active == "a" and engine.gate.is_open
    assert phases.pairs() == [("check", "started"), ("check", "failed")]
