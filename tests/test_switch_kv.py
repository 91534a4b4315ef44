"""KV snapshots in a switch: save before the unload, restore before activation, the proof
by the next turn, and the steps that run beside the load, on the fakes of tests/fakes.py.
Tests wait on events, never on sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from hotmodel.control.commands import Snapshot, Switch
from hotmodel.control.controller import Controller
from hotmodel.control.engine import Engine
from hotmodel.control.plan import Step, beside_load, plan
from hotmodel.control.report import Outcome, PhaseStatus, SwitchReport, SwitchState
from hotmodel.errors import RouterError
from hotmodel.sessions.service import SessionRef
from tests.fakes import (
    FakeKv,
    FakeRouter,
    Phases,
    control,
    fake_engine,
    run,
    switch,
)


def _beside_engine(router: FakeRouter) -> tuple[Engine, FakeKv]:
    engine, kv = fake_engine(router), FakeKv()
    engine.kv, engine.exit_in_background = kv, True
    kv.save_gate = asyncio.Event()
    return engine, kv


def test_plans_with_kv_snapshots() -> None:
    assert plan("zero_overlap", "a", "b", kv=True) == (
        Step.CHECK,
        Step.DRAIN,
        Step.SAVE,
        Step.UNLOAD,
        Step.SETTLE,
        Step.LOAD,
        Step.RESTORE,
        Step.ACTIVATE,
        Step.REPLAY,
    )
    assert Step.RESTORE in plan("zero_overlap", None, "b", kv=True)
    assert Step.SAVE not in plan("zero_overlap", "a", "b")


def test_kv_save_before_unload_and_restore_before_activation() -> None:
    router, kv = FakeRouter("a"), FakeKv()
    engine = fake_engine(router)
    engine.kv = kv
    replayed: list[str] = []

    async def replay(model: str, session: SessionRef | None = None) -> dict[str, Any]:
        replayed.append(model)
        return {"prompt_tokens": 3, "cache_tokens": 100}

    engine.replayer = replay
    phases = Phases()
    report = switch(engine, "b", phases)
    assert kv.calls == ["save a", "saved a", "folder", "restore b"]  # the folder, then a load
    assert router.calls == ["unload a", "load b"]
    assert report.snapshot["save"]["tokens"] == 100
    # requests are let in at once: the next turn reads what was added, and proves it
    assert replayed == [] and report.replay is None
    assert ("replay", "skipped") in phases.pairs()
    assert report.snapshot["restore"]["took"] is None
    assert kv.calls[-1] == "restore b"  # no proof asked of the store during the switch
    # the proof comes later, from the session's next turn (Snapshots.turn_ended, tested in
    # test_snapshots.py): the report holds the store's own record of the restore, so the
    # verdict written there shows in /admin/switches
    assert report.snapshot["restore"] is kv.info


def test_overlap_replays_a_restored_model_before_it_serves_and_that_proves_it() -> None:
    kv = FakeKv()
    engine = fake_engine(FakeRouter("a"), policy="overlap")
    engine.kv = kv
    order: list[str] = []

    async def replay(model: str, session: SessionRef | None = None) -> dict[str, Any]:
        order.append(f"replay {model} (active {engine.active})")
        return {"session": "s", "prompt_tokens": 3, "cache_tokens": 100}

    engine.replayer = replay
    report = switch(engine, "b")
    assert order == ["replay b (active a)"]  # the old model still serves meanwhile
    assert report.snapshot["restore"]["took"] is True and kv.discarded == []


def test_a_restore_that_did_not_take_is_discarded_and_replay_covers_it() -> None:
    kv = FakeKv(restored_tokens=500)
    engine = fake_engine(FakeRouter("a"), policy="overlap")
    engine.kv = kv

    async def replay(model: str, session: SessionRef | None = None) -> dict[str, Any]:
        return {"session": "s", "prompt_tokens": 520, "cache_tokens": 0}  # none from the cache

    engine.replayer = replay
    report = switch(engine, "b")
    assert report.outcome is Outcome.OK
    assert report.snapshot["restore"]["took"] is False
    assert any("did not take" in w for w in report.warnings)
    assert kv.discarded == ["b: its restore did not take"]


def test_a_failed_save_is_a_warning_not_a_failed_switch() -> None:
    kv = FakeKv(fail_save=True)
    engine = fake_engine(FakeRouter("a"))
    engine.kv = kv
    report = switch(engine, "b")
    assert report.outcome is Outcome.OK and engine.active == "b"
    assert report.warnings == ["KV snapshot save failed: slot save answered 500"]
    assert report.snapshot["save"] == {"saved": False, "reason": "failed: slot save answered 500"}


def test_the_snapshot_command_saves_and_changes_nothing() -> None:
    router, kv = FakeRouter("a"), FakeKv()
    engine = fake_engine(router)
    engine.kv = kv
    report = run(lambda c: c.submit(Snapshot()), engine)
    assert kv.calls == ["save a", "saved a"] and router.calls == []
    assert report.outcome is Outcome.OK and engine.active == "a"


def test_steps_beside_the_load() -> None:
    steps = plan("zero_overlap", "a", "b", kv=True)
    assert beside_load(steps, True) == (Step.SAVE, Step.UNLOAD, Step.SETTLE)
    assert beside_load(steps, False) == ()  # device memory to settle: in order
    assert beside_load(plan("zero_overlap", "a", "b"), True) == ()  # nothing to save
    assert beside_load(plan("overlap", "a", "b", kv=True), True) == ()  # saved after
    assert beside_load(plan("zero_overlap", "a", None, kv=True), True) == ()  # no load
    assert beside_load(plan("zero_overlap", "a", "b", kv=True, restart=True), True) == ()
    assert beside_load(plan("zero_overlap", "a", "a", kv=True), True, same_model=True) == ()


def test_a_reload_saves_and_unloads_the_model_before_loading_it_again() -> None:
    router = FakeRouter("a")
    engine, kv = _beside_engine(router)
    assert kv.save_gate is not None
    kv.save_gate.set()
    report = run(lambda c: c.submit(Switch("a", reload=True)), engine)
    assert report.outcome is Outcome.OK and router.status["a"] == "loaded"
    assert router.calls == ["unload a (background)", "exited a", "load a"]


def test_without_device_memory_the_leaving_model_is_saved_while_the_next_loads() -> None:
    router = FakeRouter("a")
    engine, kv = _beside_engine(router)
    phases = Phases()

    async def scenario(controller: Controller) -> tuple[list[str], SwitchState, SwitchReport]:
        pending = controller.post(Switch("b"), phases)
        assert kv.save_gate is not None
        try:
            await router.load_started.wait()  # b loads while a's save has not finished
            seen = (list(kv.calls), engine.state)
        finally:
            kv.save_gate.set()
        return (*seen, await pending)

    calls, state, report = run(scenario, engine)
    assert calls == ["folder", "save a"] and state is SwitchState.LOADING
    assert report.outcome is Outcome.OK and engine.active == "b"
    assert kv.calls == ["folder", "save a", "saved a", "restore b"]  # restored after both
    assert router.calls == ["load b", "unload a (background)"]
    assert {"save", "unload", "load", "restore"} <= set(report.phases)
    starts = report.phase_starts  # where each ran, for the dashboard's bar
    assert set(starts) == set(report.phases)
    assert starts["load"] <= starts["save"] <= starts["unload"] <= starts["restore"]
    assert report.to_json()["phase_starts"] == starts


def test_a_load_that_fails_beside_a_save_lets_it_end_and_keeps_the_model_loaded() -> None:
    router = FakeRouter("a", broken=frozenset({"b"}))
    engine, kv = _beside_engine(router)
    phases = Phases()

    async def scenario(controller: Controller) -> tuple[list[str], SwitchReport]:
        pending = controller.post(Switch("b"), phases)
        assert kv.save_gate is not None
        try:
            await phases.reached("load", PhaseStatus.FAILED)  # while a's save runs
            seen = list(kv.calls)
        finally:
            kv.save_gate.set()
        return seen, await pending

    seen, report = run(scenario, engine)
    assert seen == ["folder", "save a"]
    assert report.outcome is Outcome.FAILED and report.failed_phase == "load"
    assert "saved a" in kv.calls  # the save ended: its snapshot is kept
    assert router.calls == ["load b", "unload b"]  # a was never unloaded: it keeps its KV
    assert engine.active == "a" and router.status["a"] == "loaded"
    assert "unload" not in report.phases


def test_a_rollback_that_loads_the_previous_model_again_restores_its_snapshot() -> None:
    router = FakeRouter("a", broken=frozenset({"b"}))
    engine, kv = fake_engine(router), FakeKv()
    engine.kv = kv
    report = switch(engine, "b")
    assert report.outcome is Outcome.FAILED and report.rolled_back is True
    assert kv.calls == ["save a", "saved a", "folder", "restore a"]
    assert report.snapshot["rollback_restore"]["restored"] is True


def test_an_unload_that_fails_beside_the_load_rolls_the_switch_back() -> None:
    router = FakeRouter("a")
    engine, kv = _beside_engine(router)
    assert kv.save_gate is not None
    kv.save_gate.set()

    unload = router.unload

    async def refuse(model: str, timeout: float, background: bool = False) -> bool:
        if model == "a":
            raise RouterError("the router refused the unload")
        return await unload(model, timeout, background)

    router.unload = refuse  # type: ignore[method-assign]
    report = switch(engine, "b")
    assert report.outcome is Outcome.FAILED and report.failed_phase == "unload"
    assert engine.active == "a" and router.status["b"] == "unloaded"


def test_a_switch_past_its_deadline_stops_the_save_beside_the_load() -> None:
    router = FakeRouter("a")
    engine, kv = _beside_engine(router)
    engine.config = dataclasses.replace(engine.config, switch_timeout_seconds=0.2)
    router.load_gate = asyncio.Event()  # neither the load nor the save ever ends
    report = switch(engine, "b")
    assert report.outcome is Outcome.FAILED and "switch_timeout_seconds" in (report.error or "")
    assert report.failed_phase == "load"  # the main lane's step, not the save beside it
    assert "saved a" not in kv.calls and engine.active == "a"


def test_a_stopped_control_loop_leaves_no_step_running_beside_the_load() -> None:
    router = FakeRouter("a")
    engine, kv = _beside_engine(router)
    router.load_gate = asyncio.Event()  # neither the load nor the save ends

    async def main() -> list[asyncio.Task[Any]]:
        async with control(engine) as controller:
            controller.post(Switch("b"))
            await router.load_started.wait()
            await asyncio.sleep(0)
            assert kv.calls[-1] == "save a"
        # the loop was cancelled mid-switch (a shutdown): nothing beside it goes on
        tasks = asyncio.all_tasks()
        return [t for t in tasks if getattr(t.get_coro(), "__qualname__", "") == "Engine._beside"]

    assert asyncio.run(main()) == []
