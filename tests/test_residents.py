"""Resident companions (``resident = true``): the preset key, the router's model count,
the scheduler's view of their requests, and the control loop's commands for them, all
pure or with recording fakes (the real router is in test_residents_real.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from hotmodel.config import load_config
from hotmodel.control.commands import Recover, Switch, SyncResidents
from hotmodel.control.controller import Controller
from hotmodel.control.report import Outcome, SwitchReport
from hotmodel.control.residents import Residents, residents_to_load
from hotmodel.control.scheduler import Decision, Scheduler, View, Waiting, decide
from hotmodel.control.traffic import TrafficGate
from hotmodel.control.watchdog import Watchdog
from hotmodel.errors import (
    ConfigError,
    ModelResidentError,
    ResidentUnavailableError,
    SwitchBusyError,
)
from hotmodel.presets import load_presets
from hotmodel.router.models import ModelState
from hotmodel.router.supervisor import router_argv
from tests.fakes import RULES, Clock, FakeProcess, FakeRouter, RecordingController, fake_engine

_T = TypeVar("_T")

INI = """version = 1

[*]
c = 2048

[chat]
model = chat.gguf

[other]
model = other.gguf

[embed]
model = embed.gguf
resident = true
"""
TOML = '[router]\nmodels_preset = "m.ini"\ndefault_model = "chat"\n'


def _write(folder: Path, ini: str = INI, toml: str = TOML) -> Path:
    (folder / "m.ini").write_text(ini)
    path = folder / "c.toml"
    path.write_text(toml)
    return path


def test_resident_is_parsed_and_never_rendered_for_the_router(tmp_path: Path) -> None:
    presets = load_presets(_write(tmp_path).with_name("m.ini"))
    assert presets.residents == ("embed",)
    assert presets.models["embed"].resident and not presets.models["chat"].resident
    assert "resident" not in presets.models["embed"].options
    rendered = presets.render()
    assert "[embed]" in rendered
    assert not [line for line in rendered.splitlines() if line.startswith("resident")]


@pytest.mark.parametrize("value", ["True", "FALSE", " true "])
def test_resident_values_ignore_case(tmp_path: Path, value: str) -> None:
    presets = load_presets(_write(tmp_path, INI.replace("= true", f"= {value}")).parent / "m.ini")
    assert presets.models["embed"].resident is (value.strip().lower() == "true")


@pytest.mark.parametrize(
    ("ini", "expected"),
    [
        (INI.replace("resident = true", "resident = yes"), "[embed] resident: expected true or "),
        (INI.replace("resident = true", "resident ="), "[embed] resident: expected true or false"),
        (INI.replace("c = 2048", "resident = true"), "[*] resident: resident applies to one"),
    ],
)
def test_bad_resident_values_name_file_section_and_key(
    tmp_path: Path, ini: str, expected: str
) -> None:
    path = _write(tmp_path, ini).with_name("m.ini")
    with pytest.raises(ConfigError) as info:
        load_presets(path)
    assert str(info.value).startswith(f"{path} {expected}")


def test_the_default_model_cannot_be_resident(tmp_path: Path) -> None:
    path = _write(tmp_path, toml=TOML.replace('"chat"', '"embed"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path} [router] default_model: 'embed' is resident")


def test_models_max_leaves_room_for_each_resident(tmp_path: Path) -> None:
    two = INI + "\n[rerank]\nmodel = rerank.gguf\nresident = true\n"
    cfg = load_config(_write(tmp_path, two, TOML + "models_max = 2\n"))
    argv = router_argv(cfg, Path("/bin/llama-server"), Path("/s/p.ini"), 4242)
    assert argv[argv.index("--models-max") + 1] == "4"  # 2 switched + 2 residents
    spare = router_argv(cfg, Path("/bin/llama-server"), Path("/s/p.ini"), 4242, spare=True)
    assert spare[spare.index("--models-max") + 1] == "5"
    none = load_config(_write(tmp_path, INI.replace("resident = true", ""), TOML))
    argv = router_argv(none, Path("/bin/llama-server"), Path("/s/p.ini"), 4242)
    assert argv[argv.index("--models-max") + 1] == "1"


# ---- the scheduler: a resident's requests are no traffic of the active model ----


def test_a_residents_requests_do_not_keep_the_active_model_busy() -> None:
    """A resident's tickets (model = the resident) are not ``inflight({active})``: the
    decision sees the active model idle and switches for the waiters after the linger,
    while the resident's request is still in flight."""

    async def scenario() -> tuple[View, View, Decision]:
        controller, clock = RecordingController(), Clock()
        gate = TrafficGate()
        sched = Scheduler(
            controller,  # type: ignore[arg-type]
            gate,
            lambda: RULES,
            lambda: 8,
            clock,
        )
        async with gate.admit(1) as active_ticket:
            active_ticket.model = "a"
            busy = sched.view()
        async with gate.admit(1) as companion:
            companion.model = "embed"
            waiter = asyncio.create_task(sched.wait_for("b", None, 60))
            await asyncio.sleep(0)
            clock.now += RULES.linger + 1  # the active model answered nothing since
            idle = sched.view()
            decision = decide(idle, RULES)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        return busy, idle, decision

    busy, idle, decision = asyncio.run(scenario())
    assert busy.busy  # the active model's own request counts
    assert not idle.busy  # the resident's does not
    assert "embed" not in idle.queues  # it never queues
    assert decision.target == "b" and decision.reason.startswith("batch: 1 waiting for b")


def test_decide_with_a_companion_loaded_beside() -> None:
    """The decision's view holds the active model and the queues only: a companion loaded
    beside it (its traffic not busy, no queue of its own) changes nothing."""
    seen = View(
        now=100.0,
        active="a",
        busy=False,  # the companion's in-flight requests are not the active model's
        last_request=99.0,
        resident_since=50.0,
        queues={"b": Waiting(2, 98.0)},
    )
    assert decide(seen, RULES) == Decision("b", "batch: 2 waiting for b, oldest 2.0 s")
    assert decide(dataclasses.replace(seen, queues={}), RULES) == Decision(None)


def test_a_switch_closes_the_gate_for_the_active_model_but_not_for_a_resident() -> None:
    async def scenario() -> tuple[bool, str]:
        gate = TrafficGate()
        gate.close()  # a zero_overlap switch holds new requests
        async with gate.admit(5, beside=True) as ticket:
            ticket.model = "embed"
            passed = True
        held = asyncio.create_task(gate.admit(0.05).__aenter__())
        (outcome,) = await asyncio.gather(held, return_exceptions=True)
        gate.close(for_recovery=True)  # a recovery holds everyone: the router comes back
        try:
            async with gate.admit(0.05, beside=True):
                pass
        except SwitchBusyError as exc:
            return passed, f"{type(outcome).__name__} / recovery: {exc}"
        return passed, "not held"

    passed, held = asyncio.run(scenario())
    assert passed
    assert held.startswith("SwitchBusyError / recovery: a model switch is in progress")


# ---- the control loop: loaded at start, untouched by switches, reloaded after a restart ----


def _controller(router: FakeRouter, **kw: Any) -> Controller:
    engine = fake_engine(router, **kw)
    residents = Residents(router, ("embed",))
    return Controller(engine, ("a", "b", "c", "embed"), residents)


def test_switches_and_failed_loads_elsewhere_never_touch_a_resident() -> None:
    router = FakeRouter("a", models=("a", "b", "c", "embed"), broken=frozenset({"c"}))

    async def scenario(controller: Controller) -> list[SwitchReport]:
        first = await controller.submit(SyncResidents())
        reports = [first]
        for target in ("b", "c", "a"):  # c fails to load: rollback to b
            reports.append(await controller.submit(Switch(target)))
        with pytest.raises(ModelResidentError, match="'embed' is resident"):
            controller.post(Switch("embed"))
        return reports

    for policy in ("zero_overlap", "overlap"):
        router.calls.clear()
        router.status = {m: "loaded" if m == "a" else "unloaded" for m in router.status}
        controller = _controller(router, policy=policy)
        reports = run_with(controller, scenario)
        assert [r.outcome for r in reports] == [Outcome.OK, Outcome.OK, Outcome.FAILED, Outcome.OK]
        assert reports[2].rolled_back or policy == "overlap"
        embed_calls = [c for c in router.calls if c.endswith("embed")]
        assert embed_calls == ["load embed"], (policy, router.calls)
        assert router.status["embed"] == "loaded"
        assert controller.residents.status() == {"embed": "loaded"}
        assert controller.active == "a"


def test_a_restarted_router_gets_its_residents_back_and_a_failed_one_is_shown() -> None:
    router = FakeRouter(None, models=("a", "b", "c", "embed"), broken=frozenset({"embed"}))

    async def scenario(controller: Controller) -> tuple[SwitchReport, dict[str, str], str]:
        failed = await controller.submit(SyncResidents())
        failed_state = controller.residents.status()
        router.broken.clear()
        process = FakeProcess()
        controller.engine.process = process
        process.running = False  # the router died: the recovery restarts it
        await controller.submit(Recover("a"))
        return failed, failed_state, controller.residents.status()["embed"]

    controller = _controller(router, active=None)
    failed, failed_state, after = run_with(controller, scenario)
    assert failed.outcome is Outcome.FAILED and "'embed' failed to load" in (failed.error or "")
    assert failed_state == {"embed": "failed"}
    assert controller.residents.errors() == {}  # loaded now: no error left
    assert after == "loaded" and controller.active == "a"
    assert router.calls[-2:] == ["load a", "load embed"]  # the target first, then the resident
    with pytest.raises(ResidentUnavailableError, match="'x' is being loaded"):
        controller.residents.check_ready("x")


def test_a_reload_that_removes_a_resident_unloads_it_and_a_lost_one_comes_back() -> None:
    router = FakeRouter("a", models=("a", "b", "c", "embed"))

    async def scenario(controller: Controller) -> tuple[str, str, str]:
        await controller.submit(SyncResidents())
        router.status["embed"] = "unloaded"  # its process crashed
        lost = await controller.submit(SyncResidents(lost="embed"))
        controller.residents.names = frozenset()  # a reload removed it
        await controller.submit(SyncResidents())
        late = await controller.submit(SyncResidents(lost="embed"))  # its unload's event
        return lost.outcome.value, late.outcome.value, router.status["embed"]

    controller = _controller(router)
    assert run_with(controller, scenario) == ("ok", "skipped", "unloaded")
    assert router.calls == ["load embed", "load embed", "unload embed"]
    assert controller.residents.status() == {}


def test_residents_to_load_names_those_a_running_router_lacks(tmp_path: Path) -> None:
    old = load_presets(_write(tmp_path).with_name("m.ini"))
    edited = INI.replace("resident = true", "resident = true\nc = 512")
    (tmp_path / "new").mkdir()
    new = load_presets(_write(tmp_path / "new", edited).with_name("m.ini"))
    same = load_presets(tmp_path / "m.ini")  # read again: equal, not the same object
    assert residents_to_load(old, new) == ("embed",)  # paths and options differ
    assert residents_to_load(new, new) == ()
    assert residents_to_load(old, same) == ()


def run_with(controller: Controller, scenario: Callable[[Controller], Awaitable[_T]]) -> _T:
    async def main() -> _T:
        task = asyncio.create_task(controller.run())
        try:
            return await scenario(controller)
        finally:
            controller.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return asyncio.run(main())


def test_a_residents_requests_do_not_keep_the_switched_model_from_its_idle_unload() -> None:
    async def scenario() -> tuple[float, float, float]:
        gate = TrafficGate()
        async with gate.admit(1) as chat:
            chat.model = "a"
            busy = gate.idle_for()
        await asyncio.sleep(0.05)
        async with gate.admit(1, beside=True) as embed:
            embed.model = "embed"
            while_embedding = gate.idle_for()
        after = gate.idle_for()
        return busy, while_embedding, after

    busy, while_embedding, after = asyncio.run(scenario())
    assert busy == 0.0  # a chat request in flight: not idle
    assert while_embedding >= 0.05  # the resident's request is not activity
    assert after >= while_embedding  # nor is its end


def test_the_health_probe_notices_a_resident_that_died_while_a_command_ran() -> None:
    """Its event came while a switch ran (ignored then): the next probe finds it unloaded
    in the router's list and the loop loads it again; the active model is left alone."""
    router = FakeRouter("a", models=("a", "b", "c", "embed"))
    listed = {"a": ModelState.LOADED, "embed": ModelState.UNLOADED}

    class Listing:
        on_model_lost: Any = None

        async def models(self) -> dict[str, Any]:
            return {m: SimpleNamespace(state=s) for m, s in listed.items()}

    async def scenario(controller: Controller) -> tuple[bool, list[str]]:
        await controller.submit(SyncResidents())
        router.status["embed"] = "unloaded"  # it crashed while a command ran
        config = SimpleNamespace(router=SimpleNamespace(restart_attempts=1))
        dog = Watchdog(config, None, Listing(), controller)  # type: ignore[arg-type]
        asked = await dog._check_active_model()
        await controller.submit(SyncResidents())  # runs after what the probe posted
        return asked, list(router.calls)

    controller = _controller(router)
    asked, calls = run_with(controller, scenario)
    assert asked is False  # no recovery: the active model is fine
    assert calls == ["load embed", "load embed"]  # loaded at start, then again
    assert controller.residents.status() == {"embed": "loaded"}
