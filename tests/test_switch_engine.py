"""The switch engine's decisions, driven synchronously with recording fakes.

The router and the GPU are fakes here (the real ones are in
test_switch_real.py); the traffic gate is the real one (it is pure asyncio).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from hotmodel.config import SwitchConfig
from hotmodel.errors import ModelLoadError, ModelNotFoundError, SwitchBusyError
from hotmodel.gpu import GpuDevice, GpuSnapshot
from hotmodel.router_client import ModelStatus
from hotmodel.switch import Step, SwitchEngine, SwitchEvent, SwitchState, plan
from hotmodel.traffic import TrafficGate


class FakeRouter:
    """Records every call; loads succeed unless the model is in ``broken``."""

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

    async def load_and_wait(
        self, model: str, timeout: float, log_tail: Callable[[], str] = lambda: ""
    ) -> ModelStatus:
        self.calls.append(f"load {model}")
        self.status[model] = "loading"
        if self.load_gate is not None:
            await self.load_gate.wait()
        await asyncio.sleep(0)
        if model in self.broken:
            self.status[model] = "unloaded"
            raise ModelLoadError(f"model {model!r} failed to load (exit code 1)", log_tail())
        self.status[model] = "loaded"
        return ModelStatus(model, "loaded")

    async def unload_and_wait(self, model: str, timeout: float) -> ModelStatus:
        self.calls.append(f"unload {model}")
        await asyncio.sleep(0)
        self.status[model] = "unloaded"
        return ModelStatus(model, "unloaded")

    async def models(self) -> dict[str, ModelStatus]:
        return {m: ModelStatus(m, v) for m, v in self.status.items()}


class FakeGpu:
    """Answers scripted used-MiB readings, one per snapshot (the last one repeats)."""

    name = "fake"

    def __init__(self, readings: list[int]) -> None:
        self.readings = readings
        self.taken = 0

    def snapshot(self) -> GpuSnapshot | None:
        used = self.readings[min(self.taken, len(self.readings) - 1)]
        self.taken += 1
        return GpuSnapshot((GpuDevice(0, "Fake GPU", used, 80_000),), "fake")


def _engine(
    router: FakeRouter,
    active: str | None = "a",
    gate: TrafficGate | None = None,
    drain: float = 0.2,
    **cfg: Any,
) -> SwitchEngine:
    config = dataclasses.replace(SwitchConfig(settle_timeout_seconds=0.5), **cfg)
    return SwitchEngine(
        config=config,
        drain_timeout=drain,
        router=router,
        gate=gate or TrafficGate(),
        presets=router.status,
        active=active,
        log_tail=lambda: "llama log line",
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_plans() -> None:
    assert plan("zero_overlap", "a", "b") == (
        Step.DRAIN,
        Step.UNLOAD,
        Step.SETTLE,
        Step.LOAD,
        Step.REPLAY,
        Step.ACTIVATE,
    )
    assert plan("overlap", "a", "b") == (
        Step.LOAD,
        Step.REPLAY,
        Step.ACTIVATE,
        Step.DRAIN,
        Step.UNLOAD,
    )
    assert plan("zero_overlap", None, "b") == (Step.LOAD, Step.REPLAY, Step.ACTIVATE)


def test_zero_overlap_unloads_before_loading() -> None:
    router = FakeRouter("a")
    engine = _engine(router)
    events: list[SwitchEvent] = []
    report = run(engine.switch("b", events.append))
    assert router.calls == ["unload a", "load b"]
    assert report.outcome == "ok"
    assert (report.from_model, report.to_model, report.active_after) == ("a", "b", "b")
    assert engine.active == "b"
    assert engine.state is SwitchState.IDLE
    assert set(report.phases) == {"drain", "unload", "load"}  # settle/replay were skipped
    assert report.gpu == {
        "before_unload": None,
        "after_unload": None,
        "after_settle": None,
        "after_load": None,
    }
    assert [(e.phase, e.status) for e in events] == [
        ("drain", "started"),
        ("drain", "done"),
        ("unload", "started"),
        ("unload", "done"),
        ("settle", "started"),
        ("settle", "skipped"),
        ("load", "started"),
        ("load", "done"),
        ("replay", "started"),
        ("replay", "skipped"),
        ("activate", "started"),
        ("activate", "done"),
    ]
    assert list(engine.history) == [report]


def test_gpu_snapshots_and_settle() -> None:
    # before_unload 8000, after_unload 900, then falling to 400 and steady: settled.
    gpu = FakeGpu([8000, 900, 600, 400, 400, 6000])
    router = FakeRouter("a")
    engine = _engine(router, settle_tolerance_mib=16)
    engine.gpu = gpu
    report = run(engine.switch("b"))
    used = {k: v["used_mib"] if v else None for k, v in report.gpu.items()}
    assert used == {
        "before_unload": 8000,
        "after_unload": 900,
        "after_settle": 400,
        "after_load": 6000,
    }
    assert report.gpu["after_load"]["devices"][0]["name"] == "Fake GPU"
    assert "settle" in report.phases


def test_settle_stops_at_the_baseline_at_once() -> None:
    gpu = FakeGpu([8000, 310, 6000])
    engine = _engine(FakeRouter("a"), settle_tolerance_mib=16)
    engine.gpu, engine.baseline_mib = gpu, 300
    report = run(engine.switch("b"))
    assert report.gpu["after_settle"]["used_mib"] == 310
    assert gpu.taken == 3  # no settle polling needed


def test_settle_gives_up_at_its_deadline_and_goes_on() -> None:
    gpu = FakeGpu([8000, 7990])  # memory never falls (held by another process)
    engine = _engine(FakeRouter("a"), settle_timeout_seconds=0.3, settle_tolerance_mib=16)
    engine.gpu = gpu
    events: list[SwitchEvent] = []
    report = run(engine.switch("b", events.append))
    assert report.outcome == "ok"
    settle_done = [e for e in events if e.phase == "settle" and e.status == "done"]
    assert settle_done[0].detail is not None
    assert "still at 7990 MiB" in settle_done[0].detail
    assert 250 <= report.phases["settle"] < 2000


def test_failed_load_rolls_back_to_the_previous_model() -> None:
    router = FakeRouter("a", broken=frozenset({"b"}))
    engine = _engine(router)
    report = run(engine.switch("b"))
    assert report.outcome == "failed"
    assert report.error == "model 'b' failed to load (exit code 1)"
    assert report.log_tail == "llama log line"
    assert report.rolled_back is True
    assert report.active_after == "a" and engine.active == "a"
    assert engine.state is SwitchState.IDLE
    assert router.calls == [
        "unload a",
        "load b",
        "load a",
    ]
    assert "rollback" in report.phases
    assert engine.gate.is_open


def test_failed_rollback_leaves_no_model_and_says_so() -> None:
    router = FakeRouter("a", broken=frozenset({"a", "b"}))
    engine = _engine(router)
    report = run(engine.switch("b"))
    assert report.outcome == "failed"
    assert report.rolled_back is False
    assert engine.active is None and report.active_after is None
    assert engine.state is SwitchState.FAILED
    assert "rollback to 'a' failed: model 'a' failed to load" in (report.error or "")
    # the next switch starts from nothing: it only loads
    router.broken.clear()
    again = run(engine.switch("c"))
    assert again.outcome == "ok" and engine.active == "c"
    assert router.calls[-1:] == ["load c"]


def test_timed_out_load_is_unloaded_before_the_rollback() -> None:
    router = FakeRouter("a")

    async def never_loaded(
        model: str, timeout: float, log_tail: Callable[[], str] = lambda: ""
    ) -> ModelStatus:
        router.calls.append(f"load {model}")
        if model == "b":
            router.status[model] = "loading"  # still loading when the deadline hit
            raise ModelLoadError("model 'b' did not reach 'loaded' within 1s")
        router.status[model] = "loaded"
        return ModelStatus(model, "loaded")

    router.load_and_wait = never_loaded  # type: ignore[method-assign]
    report = run(_engine(router).switch("b"))
    assert report.outcome == "failed" and report.rolled_back
    # b was still `loading`: it must go before a comes back (models_max = 1)
    assert router.calls[2:] == ["unload b", "load a"]


def test_drain_waits_for_in_flight_requests_before_unloading() -> None:
    async def scenario() -> list[str]:
        router = FakeRouter("a")
        gate = TrafficGate()
        engine = _engine(router, gate=gate, drain=5.0)
        ticket = await gate.enter(1)
        ticket.model = "a"
        switching = asyncio.create_task(engine.switch("b"))
        await asyncio.sleep(0.05)
        assert engine.state is SwitchState.DRAINING
        assert router.calls == []  # nothing unloaded while a generation runs
        assert not gate.is_open
        router.calls.append("request done")
        gate.leave(ticket)
        report = await switching
        assert report.drained == 1
        return router.calls

    assert run(scenario()) == [
        "request done",
        "unload a",
        "load b",
    ]


def test_drain_timeout_fails_the_switch_and_changes_nothing() -> None:
    async def scenario() -> None:
        router = FakeRouter("a")
        gate = TrafficGate()
        engine = _engine(router, gate=gate)
        ticket = await gate.enter(1)
        ticket.model = "a"
        report = await engine.switch("b")
        assert report.outcome == "failed"
        assert "1 generation(s) on 'a' still running after 0.2s" in (report.error or "")
        assert router.calls == []
        assert engine.active == "a" and gate.is_open
        assert report.rolled_back is False

    run(scenario())


def test_drain_timeout_can_cancel_the_requests() -> None:
    async def scenario() -> None:
        router = FakeRouter("a")
        gate = TrafficGate()
        engine = _engine(router, gate=gate, drain_timeout_action="cancel")
        ticket = await gate.enter(1)
        ticket.model = "a"

        async def request() -> None:  # a request whose upstream I/O runs in the ticket's scope
            with anyio.CancelScope() as scope:
                ticket.bind(scope)
                await asyncio.sleep(60)
            gate.leave(ticket)

        req = asyncio.create_task(request())
        report = await engine.switch("b")
        await req
        assert report.outcome == "ok" and report.cancelled == 1
        assert ticket.cancel_reason == "cancelled: switching 'a' -> 'b'"

    run(scenario())


def test_requests_wait_at_the_gate_during_a_switch() -> None:
    async def scenario() -> None:
        router = FakeRouter("a")
        router.load_gate = asyncio.Event()
        gate = TrafficGate()
        engine = _engine(router, gate=gate)
        switching = asyncio.create_task(engine.switch("b"))
        await asyncio.sleep(0.05)
        assert engine.state is SwitchState.LOADING
        with pytest.raises(SwitchBusyError, match="a model switch is in progress"):
            await gate.enter(0.05)
        waiting = asyncio.create_task(gate.enter(5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        router.load_gate.set()
        await switching
        ticket = await waiting  # admitted once the switch is over
        assert engine.active == "b"
        gate.leave(ticket)

    run(scenario())


def test_same_target_requests_share_one_switch() -> None:
    async def scenario() -> None:
        router = FakeRouter("a")
        engine = _engine(router)
        r1, r2, r3 = await asyncio.gather(
            engine.switch("b"), engine.switch("b"), engine.switch("b")
        )
        assert r1 is r2 is r3
        assert router.calls.count("load b") == 1
        assert len(engine.history) == 1

    run(scenario())


def test_switches_are_serialized() -> None:
    async def scenario() -> None:
        router = FakeRouter("a")
        engine = _engine(router)
        rb, rc = await asyncio.gather(engine.switch("b"), engine.switch("c"))
        assert (rb.from_model, rb.to_model, rc.from_model, rc.to_model) == ("a", "b", "b", "c")
        assert router.calls == [
            "unload a",
            "load b",
            "unload b",
            "load c",
        ]

    run(scenario())


def test_overlap_loads_first_and_never_closes_the_gate() -> None:
    async def scenario() -> None:
        router = FakeRouter("a")
        gate = TrafficGate()
        engine = _engine(router, gate=gate, policy="overlap")
        closed_seen = []
        original = router.load_and_wait

        async def watch(
            model: str, timeout: float, log_tail: Callable[[], str] = lambda: ""
        ) -> ModelStatus:
            closed_seen.append(not gate.is_open)
            return await original(model, timeout, log_tail)

        router.load_and_wait = watch  # type: ignore[method-assign]
        report = await engine.switch("b")
        assert report.outcome == "ok"
        assert router.calls == ["load b", "unload a"]
        assert closed_seen == [False]

    run(scenario())


def test_overlap_failed_load_keeps_the_old_model_active() -> None:
    router = FakeRouter("a", broken=frozenset({"b"}))
    engine = _engine(router, policy="overlap")
    report = run(engine.switch("b"))
    assert report.outcome == "failed"
    assert report.rolled_back is False  # nothing to roll back: a never left
    assert engine.active == "a"
    assert "unload a" not in router.calls


def test_already_active_is_a_no_op() -> None:
    router = FakeRouter("a")
    report = run(_engine(router).switch("a"))
    assert report.outcome == "already_active"
    assert router.calls == []


def test_unknown_target() -> None:
    with pytest.raises(ModelNotFoundError, match="'zzz' is not a preset"):
        run(_engine(FakeRouter("a")).switch("zzz"))


def test_replay_hook_runs_after_the_load() -> None:
    router = FakeRouter("a")
    engine = _engine(router)
    seen: list[tuple[str, list[str]]] = []

    async def replay(model: str) -> dict[str, Any]:
        seen.append((model, list(router.calls)))
        return {"prompt_n": 42}

    engine.replay = replay
    report = run(engine.switch("b"))
    assert seen == [("b", ["unload a", "load b"])]
    assert report.replay == {"prompt_n": 42}
    assert "replay" in report.phases
