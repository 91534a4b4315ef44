"""The control loop and its engine, driven synchronously with recording fakes.

The router and the GPU are fakes here (the real ones are in
test_switch_real.py); the traffic gate is the real one (it is pure asyncio).
Tests wait on events (a phase started, a load began), never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from hotmodel.config import Config, SwitchConfig, load_config
from hotmodel.control.commands import Recover, Snapshot, Switch, Unload
from hotmodel.control.controller import Controller
from hotmodel.control.engine import Engine
from hotmodel.control.gpu import GpuDevice, GpuReading
from hotmodel.control.plan import Step, beside_load, plan
from hotmodel.control.report import Outcome, PhaseStatus, SwitchEvent, SwitchReport, SwitchState
from hotmodel.control.traffic import TrafficGate
from hotmodel.errors import (
    ConfigError,
    ModelLoadError,
    ModelNotFoundError,
    RouterError,
    ShuttingDownError,
    SwitchBusyError,
)
from hotmodel.presets import Presets
from hotmodel.sessions.service import SessionRef
from tests.conftest import write_config

_T = TypeVar("_T")


class FakeRouter:
    """Records every call; loads succeed unless the model is in ``broken``. Idempotent
    like the real client: loading a running model or unloading a stopped one is a no-op."""

    def __init__(
        self,
        loaded: str | None,
        models: tuple[str, ...] = ("a", "b", "c"),
        broken: frozenset[str] = frozenset(),
    ) -> None:
        self.status = {m: "loaded" if m == loaded else "unloaded" for m in models}
        self.broken = set(broken)
        self.calls: list[str] = []
        self.load_gate: asyncio.Event | None = None  # when set, loads wait for it
        self.load_started = asyncio.Event()

    async def load(self, model: str, timeout: float) -> bool:
        if self.status[model] == "exiting":  # like the real one: its exit comes first
            await self.exited()
        self.calls.append(f"load {model}")
        if self.status[model] == "loaded":
            return False
        self.status[model] = "loading"
        self.load_started.set()
        if self.load_gate is not None:
            await self.load_gate.wait()
        await asyncio.sleep(0)
        if model in self.broken:
            self.status[model] = "unloaded"
            raise ModelLoadError(f"model {model!r} failed to load (exit code 1)", "llama log line")
        self.status[model] = "loaded"
        return True

    async def unload(self, model: str, timeout: float, background: bool = False) -> bool:
        self.calls.append(f"unload {model}" + (" (background)" if background else ""))
        await asyncio.sleep(0)
        was = self.status[model] != "unloaded"
        self.status[model] = "exiting" if background and was else "unloaded"
        return was

    @property
    def exiting(self) -> frozenset[str]:
        return frozenset(m for m, status in self.status.items() if status == "exiting")

    async def exited(self) -> None:
        for model, status in self.status.items():
            if status == "exiting":
                self.calls.append(f"exited {model}")
                self.status[model] = "unloaded"


class FakeGpu:
    """Answers scripted used-MiB readings, one per snapshot (the last one repeats)."""

    name = "fake"

    def __init__(self, readings: list[int]) -> None:
        self.readings = readings
        self.taken = 0

    def read(self) -> GpuReading | None:
        used = self.readings[min(self.taken, len(self.readings) - 1)]
        self.taken += 1
        return GpuReading((GpuDevice(0, "Fake GPU", used, 80_000),), "fake")


class Phases:
    """A listener that records events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[SwitchEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: SwitchEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def pairs(self) -> list[tuple[str, str]]:
        return [(e.phase, e.status.value) for e in self.events]

    async def reached(self, phase: str, status: PhaseStatus = PhaseStatus.STARTED) -> None:
        while not any(e.phase == phase and e.status is status for e in self.events):
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 5)


def _engine(
    router: FakeRouter,
    active: str | None = "a",
    gate: TrafficGate | None = None,
    drain: float = 0.2,
    **cfg: Any,
) -> Engine:
    config = dataclasses.replace(SwitchConfig(settle_timeout_seconds=0.5), **cfg)
    engine = Engine(
        config=config,
        drain_timeout=drain,
        lifecycle=router,
        gate=gate or TrafficGate(),
        log_tail=lambda: "llama log line",
    )
    engine.active = active
    return engine


@contextlib.asynccontextmanager
async def control(engine: Engine) -> AsyncIterator[Controller]:
    """A controller with its loop running for the block (stopped as the runtime does)."""
    controller = Controller(engine, ("a", "b", "c"))
    task = asyncio.create_task(controller.run())
    try:
        yield controller
    finally:
        controller.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run(scenario: Callable[[Controller], Awaitable[_T]], engine: Engine) -> _T:
    async def main() -> _T:
        async with control(engine) as controller:
            return await scenario(controller)

    return asyncio.run(main())


def switch(engine: Engine, target: str, listener: Phases | None = None) -> SwitchReport:
    return run(lambda c: c.submit(Switch(target), listener), engine)


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
    engine = _engine(router)
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
    engine = _engine(router, settle_tolerance_mib=16)
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
    engine = _engine(FakeRouter("a"), settle_tolerance_mib=16)
    engine.gpu, engine.baseline_mib = gpu, 300
    report = switch(engine, "b")
    assert report.gpu.after_settle is not None and report.gpu.after_settle.used_mib == 310
    assert gpu.taken == 3  # no settle polling needed


def test_settle_gives_up_at_its_deadline_and_goes_on() -> None:
    engine = _engine(FakeRouter("a"), settle_timeout_seconds=0.3, settle_tolerance_mib=16)
    engine.gpu = FakeGpu([8000, 7990])  # memory never falls (held by another process)
    phases = Phases()
    report = switch(engine, "b", phases)
    assert report.outcome is Outcome.OK
    settle_done = [e for e in phases.events if e.phase == "settle" and e.status.value == "done"]
    assert settle_done[0].detail is not None
    assert "still at 7990 MiB" in settle_done[0].detail
    assert "[switch] settle_timeout_seconds" in settle_done[0].detail
    assert 250 <= report.phases["settle"] < 2000


def test_without_device_memory_the_leaving_model_exits_while_the_next_loads() -> None:
    router = FakeRouter("a")
    engine = _engine(router)
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
    engine = _engine(router)
    engine.exit_in_background = True
    report = switch(engine, "b")
    assert report.outcome is Outcome.FAILED and report.rolled_back is True
    assert engine.active == "a" and router.status["a"] == "loaded"
    assert router.calls == ["unload a (background)", "load b", "unload b", "exited a", "load a"]


def test_a_reload_that_fails_is_taken_back_within_its_own_command(tmp_path: Path) -> None:
    """Found by a hostile pass: the switch back ran as a command of its own, after a
    switch queued meanwhile (undoing it), and the requests held by the failed switch
    were let in with no model (503) before it. The engine's settings change only in
    the loop: the reload's while it runs, the previous ones for the switch back."""
    router = FakeRouter("a", broken=frozenset({"a"}))  # a's new preset does not load
    engine = _engine(router)
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
    engine = _engine(router)
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


def test_failed_load_rolls_back_to_the_previous_model() -> None:
    router = FakeRouter("a", broken=frozenset({"b"}))
    engine = _engine(router)
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
    engine = _engine(router)
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
    report = switch(_engine(router), "b")
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
    report = switch(_engine(router, switch_timeout_seconds=0.2), "b")
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

    engine = _engine(FakeRouter("a"), drain=5.0)
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

    run(scenario, _engine(FakeRouter("a")))


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

    run(scenario, _engine(FakeRouter("a"), drain_timeout_action="cancel"))


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

        engine.replay = slow_replay
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

    run(scenario, _engine(FakeRouter("a")))


def test_same_target_requests_share_one_switch() -> None:
    async def scenario(controller: Controller) -> None:
        r1, r2, r3 = await asyncio.gather(
            controller.submit(Switch("b")),
            controller.submit(Switch("b")),
            controller.submit(Switch("b", replay=False)),
        )
        assert r1 is r2 is r3
        engine = controller.engine
        assert isinstance(engine.lifecycle, FakeRouter)
        assert engine.lifecycle.calls.count("load b") == 1
        assert len(engine.history) == 1

    run(scenario, _engine(FakeRouter("a")))


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

    run(scenario, _engine(FakeRouter("a")))


def test_a_failing_command_does_not_stop_the_loop() -> None:
    async def scenario(controller: Controller) -> None:
        engine = controller.engine
        real_run = engine.run
        calls = 0

        async def flaky(*args: Any, **kwargs: Any) -> SwitchReport:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in a step")
            return await real_run(*args, **kwargs)

        engine.run = flaky  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="a bug in a step"):
            await controller.submit(Switch("b"))
        assert not controller.busy
        assert (await controller.submit(Switch("c"))).outcome is Outcome.OK

    run(scenario, _engine(FakeRouter("a")))


def test_commands_during_shutdown_are_refused_and_queued_ones_fail() -> None:
    async def main() -> None:
        router = FakeRouter("a")
        router.load_gate = asyncio.Event()  # b's load hangs until shutdown
        engine = _engine(router)
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

    run(scenario, _engine(FakeRouter("a")))


def test_overlap_loads_first_and_never_closes_the_gate() -> None:
    router = FakeRouter("a")
    engine = _engine(router, policy="overlap")
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
    engine = _engine(router, policy="overlap")
    report = switch(engine, "b")
    assert report.outcome is Outcome.FAILED
    assert report.rolled_back is False  # nothing to roll back: a never left
    assert engine.active == "a"
    assert "unload a" not in router.calls


def test_already_active_is_a_no_op() -> None:
    router = FakeRouter("a")
    engine = _engine(router)
    report = switch(engine, "a")
    assert report.outcome is Outcome.ALREADY_ACTIVE
    assert router.calls == []
    assert not engine.history  # kept out of GET /admin/switches: no-ops would push switches out


def test_unknown_target() -> None:
    with pytest.raises(ModelNotFoundError, match="'zzz' is not a preset"):
        switch(_engine(FakeRouter("a")), "zzz")


def test_first_load_is_a_command_without_replay() -> None:
    router = FakeRouter(None)
    engine = _engine(router, active=None)
    seen: list[str] = []

    async def replay(model: str, session: SessionRef | None = None) -> dict[str, Any]:
        seen.append(model)
        return {}

    engine.replay = replay
    report = run(lambda c: c.submit(Switch("a", replay=False)), engine)
    assert report.outcome is Outcome.OK and engine.active == "a"
    assert router.calls == ["load a"] and seen == []


def test_replay_hook_runs_after_the_load() -> None:
    router = FakeRouter("a")
    engine = _engine(router)
    seen: list[tuple[str, list[str], str | None]] = []

    async def replay(model: str, session: SessionRef | None = None) -> dict[str, Any]:
        seen.append((model, list(router.calls), engine.active))
        return {"prompt_n": 42}

    engine.replay = replay
    report = switch(engine, "b")
    assert seen == [("b", ["unload a", "load b"], "b")]  # after activation
    assert report.replay == {"prompt_n": 42}
    assert "replay" in report.phases


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

    run(scenario, _engine(FakeRouter("a")))


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

    run(scenario, _engine(FakeRouter("a"), drain=5.0))


def test_a_target_that_fails_its_check_changes_nothing() -> None:
    router = FakeRouter("a")
    engine = _engine(router)

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


class FakeKv:
    """Scripted KV snapshots: what save/restore answer, and what was discarded. A save
    waits for ``save_gate`` when one is set."""

    def __init__(self, restored_tokens: int = 100, fail_save: bool = False) -> None:
        self.restored_tokens = restored_tokens
        self.fail_save = fail_save
        self.calls: list[str] = []
        self.discarded: list[str] = []
        self.save_gate: asyncio.Event | None = None
        self.info: dict[str, Any] = {}

    async def save(
        self, model: str, restoring: str | None = None, session: SessionRef | None = None
    ) -> dict[str, Any] | None:
        self.calls.append(f"save {model}")
        if self.save_gate is not None:
            await self.save_gate.wait()
        if self.fail_save:
            raise ModelLoadError("slot save answered 500")
        self.calls.append(f"saved {model}")
        return {"session": "s", "tokens": 100, "bytes": 1000, "ms": 1.0}

    async def restore(self, model: str, session: SessionRef | None = None) -> dict[str, Any] | None:
        self.calls.append(f"restore {model}" + ("" if session is None else f" for {session.id}"))
        self.info = {"restored": True, "session": "s", "tokens": self.restored_tokens}
        self.info["took"] = None
        return self.info

    def proved(self, model: str, cached: int, session_id: str | None) -> bool | None:
        if session_id != "s":
            return None
        took = cached >= self.restored_tokens // 2
        self.info["took"] = took
        if not took:
            self.discarded.append(f"{model}: its restore did not take")
        return took

    def ensure_folder(self) -> None:
        self.calls.append("folder")

    def configure(self, config: Config) -> None:
        self.calls.append("configure")


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
    engine = _engine(router)
    engine.kv = kv
    replayed: list[str] = []

    async def replay(model: str, session: SessionRef | None = None) -> dict[str, Any]:
        replayed.append(model)
        return {"prompt_tokens": 3, "cache_tokens": 100}

    engine.replay = replay
    phases = Phases()
    report = switch(engine, "b", phases)
    assert kv.calls == ["save a", "saved a", "folder", "restore b"]  # the folder, then a load
    assert router.calls == ["unload a", "load b"]
    assert report.snapshot["save"]["tokens"] == 100
    # requests are let in at once: the next turn reads what was added, and proves it
    assert replayed == [] and report.replay is None
    assert ("replay", "skipped") in phases.pairs()
    assert report.snapshot["restore"]["took"] is None
    assert kv.proved("b", 100, "s") is True and report.snapshot["restore"]["took"] is True


def test_overlap_replays_a_restored_model_before_it_serves_and_that_proves_it() -> None:
    kv = FakeKv()
    engine = _engine(FakeRouter("a"), policy="overlap")
    engine.kv = kv
    order: list[str] = []

    async def replay(model: str, session: SessionRef | None = None) -> dict[str, Any]:
        order.append(f"replay {model} (active {engine.active})")
        return {"session": "s", "prompt_tokens": 3, "cache_tokens": 100}

    engine.replay = replay
    report = switch(engine, "b")
    assert order == ["replay b (active a)"]  # the old model still serves meanwhile
    assert report.snapshot["restore"]["took"] is True and kv.discarded == []


def test_a_restore_that_did_not_take_is_discarded_and_replay_covers_it() -> None:
    kv = FakeKv(restored_tokens=500)
    engine = _engine(FakeRouter("a"), policy="overlap")
    engine.kv = kv

    async def replay(model: str, session: SessionRef | None = None) -> dict[str, Any]:
        return {"session": "s", "prompt_tokens": 520, "cache_tokens": 0}  # none from the cache

    engine.replay = replay
    report = switch(engine, "b")
    assert report.outcome is Outcome.OK
    assert report.snapshot["restore"]["took"] is False
    assert any("did not take" in w for w in report.warnings)
    assert kv.discarded == ["b: its restore did not take"]


def test_a_failed_save_is_a_warning_not_a_failed_switch() -> None:
    kv = FakeKv(fail_save=True)
    engine = _engine(FakeRouter("a"))
    engine.kv = kv
    report = switch(engine, "b")
    assert report.outcome is Outcome.OK and engine.active == "b"
    assert report.warnings == ["KV snapshot save failed: slot save answered 500"]
    assert report.snapshot["save"] == {"saved": False, "reason": "failed: slot save answered 500"}


def test_the_snapshot_command_saves_and_changes_nothing() -> None:
    router, kv = FakeRouter("a"), FakeKv()
    engine = _engine(router)
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


def _beside_engine(router: FakeRouter) -> tuple[Engine, FakeKv]:
    engine, kv = _engine(router), FakeKv()
    engine.kv, engine.exit_in_background = kv, True
    kv.save_gate = asyncio.Event()
    return engine, kv


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
    engine, kv = _engine(router), FakeKv()
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


class FakeProcess:
    def __init__(self) -> None:
        self.running = True
        self.stale = False
        self.restarts = 0

    async def restart(self) -> None:
        self.restarts += 1
        self.running = True
        self.stale = False

    def use_presets(self, presets: Presets) -> None:
        self.stale = True


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

    run(scenario, _engine(FakeRouter(None)))  # the crash took the model: it is loaded again


def test_a_switch_on_a_dead_router_starts_it_first() -> None:
    router = FakeRouter("a")
    engine = _engine(router)
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
    engine = _engine(router, policy="overlap")
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

    run(scenario, _engine(FakeRouter("a")))


def test_a_manual_unload_parks_nothing() -> None:
    async def scenario(controller: Controller) -> None:
        await controller.submit(Unload())
        assert controller.engine.active is None and controller.engine.parked is None

    run(scenario, _engine(FakeRouter("a")))
