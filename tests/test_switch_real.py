"""Switching against the real llama-server router: SmolLM2-135M <-> Gemma-3-270M.

Two architectures, two tokenizers: every switch here is a real unload of one
model process and a real load of another.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    HELLO,
    HeldStream,
    HotmodelProcess,
    chat,
    run_hotmodel,
    start_hotmodel,
    streamed_switch,
    switch,
    two_models,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow  # drives the real llama-server


@pytest.fixture(scope="module")
def switch_server(
    tmp_path_factory: pytest.TempPathFactory,
    real_models: dict[str, Path],
    tiny_models: dict[str, Path],
    llama_server: Path,
) -> Iterator[HotmodelProcess]:
    folder = tmp_path_factory.mktemp("switch")
    config = write_config(
        folder,
        {
            "smollm2": real_models["smollm2"],
            "gemma3": real_models["gemma3"],
            "broken": tiny_models["truncated"],  # a GGUF header, then cut: fails to load
            "garbage": tiny_models["garbage"],  # not a GGUF at all: refused before anything
            "missing": folder / "no-such-model.gguf",
        },
        "smollm2",
        server="switch_drain_timeout_seconds = 120",  # a bound: a loaded machine is slow
    )
    hp = start_hotmodel(config)
    yield hp
    assert hp.stop() == 0, hp.output()


def loaded_models(server: HotmodelProcess) -> list[str]:
    """The models resident on the router, once any leaving model's process is gone (on
    a CPU-only llama-server it exits while the next model loads, for ~0.1 s)."""
    router = server.status()["router"]
    assert isinstance(router, dict)
    deadline = time.monotonic() + 10
    while True:
        data = httpx.get(router["url"] + "/models", headers=server.router_auth()).json()["data"]
        loaded = [m["id"] for m in data if m["status"]["value"] in ("loaded", "loading")]
        if len(loaded) <= 1 or time.monotonic() > deadline:
            return loaded
        time.sleep(0.05)


@pytest.fixture
def on_smollm2(switch_server: HotmodelProcess) -> HotmodelProcess:
    status, report = switch(switch_server, "smollm2")
    assert status == 200, report
    return switch_server


def test_chat_goes_straight_to_the_active_models_server(on_smollm2: HotmodelProcess) -> None:
    server = on_smollm2
    direct = server.status()["router"]["direct"]  # type: ignore[index]
    assert list(direct) == ["smollm2"] and direct["smollm2"].startswith("http://127.0.0.1:")
    assert chat(server).json()["model"] == "smollm2"
    status, _ = switch(server, "gemma3")
    assert status == 200
    assert list(server.status()["router"]["direct"]) == ["gemma3"]  # type: ignore[index]
    assert chat(server).json()["model"] == "gemma3"


def test_switch_both_directions(on_smollm2: HotmodelProcess) -> None:
    server = on_smollm2
    for source, target in (("smollm2", "gemma3"), ("gemma3", "smollm2")):
        status, report = switch(server, target)
        assert status == 200, report
        assert report["outcome"] == "ok"
        assert (report["from"], report["to"], report["active_after"]) == (source, target, target)
        assert report["policy"] == "zero_overlap"
        assert set(report["phases"]) == {"check", "drain", "unload", "load"}
        assert report["phases"]["load"] > 0 and report["phases"]["unload"] > 0
        # no GPU on the test machine: the snapshots are there, and null
        assert report["gpu"] == {
            "before_unload": None,
            "after_unload": None,
            "after_settle": None,
            "after_load": None,
        }
        assert loaded_models(server) == [target]  # one model resident
        answer = chat(server)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == target
        models = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models").json()["data"]}
        assert models[target]["active"] and models[target]["status"] == "loaded"
        assert models[source]["status"] in ("unloaded", "unloading")  # its process exits
    history = httpx.get(server.base_url + "/admin/switches").json()["data"]
    assert [(r["from"], r["to"]) for r in history[:2]] == [
        ("gemma3", "smollm2"),
        ("smollm2", "gemma3"),
    ]


def test_stream_started_before_a_switch_finishes_on_the_old_model(
    on_smollm2: HotmodelProcess,
) -> None:
    server = on_smollm2
    reader, events = stream_in_background(server, 200)
    status, report = switch(server, "gemma3")
    reader.join(600)  # a busy machine generates slowly: the stream's end, not a clock
    assert not reader.is_alive()
    assert status == 200, report
    assert report["drained"] == 1
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["model"] for c in chunks} == {"smollm2"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["timings"]["predicted_n"] == 200  # the whole answer, not cut
    assert chat(server).json()["model"] == "gemma3"


def test_switch_to_a_broken_model_fails_and_rolls_back(on_smollm2: HotmodelProcess) -> None:
    server = on_smollm2
    status, report = switch(server, "broken")
    assert status == 502
    assert report["outcome"] == "failed"
    assert report["error"].startswith("model 'broken' failed to load (exit code")
    assert report["log_tail"]  # the router's own words about the bad file
    assert report["rolled_back"] is True
    assert report["active_after"] == "smollm2"
    assert "rollback" in report["phases"]
    answer = chat(server)
    assert answer.status_code == 200
    assert answer.json()["model"] == "smollm2"
    assert loaded_models(server) == ["smollm2"]


@pytest.mark.parametrize(
    ("target", "reason"), [("garbage", "is not a GGUF file"), ("missing", "model file not found")]
)
def test_a_target_that_cannot_load_is_refused_before_the_model_is_touched(
    on_smollm2: HotmodelProcess, target: str, reason: str
) -> None:
    server = on_smollm2
    router_children = [p.pid for p in server.descendants()]
    status, report = switch(server, target)
    assert status == 502
    assert report["outcome"] == "failed" and reason in report["error"]
    assert "nothing was changed" in report["error"]
    assert report["rolled_back"] is False and set(report["phases"]) == set()
    assert report["active_after"] == "smollm2"
    assert [p.pid for p in server.descendants()] == router_children  # smollm2 never left
    assert chat(server).json()["model"] == "smollm2"


def test_requests_during_a_switch_go_to_the_new_model(on_smollm2: HotmodelProcess) -> None:
    server = on_smollm2
    with ThreadPoolExecutor(max_workers=11) as pool:
        switching = pool.submit(switch, server, "gemma3")
        deadline = time.monotonic() + 10
        while server.status()["switch"]["state"] == "idle":  # type: ignore[index]
            assert time.monotonic() < deadline, "the switch never started"
            time.sleep(0.005)
        answers = list(pool.map(lambda _: chat(server), range(10)))
        status, report = switching.result()
    assert status == 200, report
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "gemma3"


def test_concurrent_switches_are_serialized(on_smollm2: HotmodelProcess) -> None:
    """Two switches to gemma3 while the first waits at its drain (a stream holds smollm2),
    then one back: the second joins the first, the one back runs after it."""
    server = on_smollm2
    with HeldStream(server) as held, streamed_switch(server, "gemma3") as first:
        wait_until("the first switch at its drain", lambda: _state(server) == "draining")
        with (
            streamed_switch(server, "gemma3") as second,
            streamed_switch(server, "smollm2") as back,
        ):
            assert not held.finished  # so all three were asked while the first ran
            held.release.set()  # the drain ends: the first switch goes on
            g1, g2, b = first(), second(), back()
    assert g1["id"] == g2["id"]  # same target: answered by one switch
    assert (g1["from"], g1["to"]) == ("smollm2", "gemma3")
    assert (b["from"], b["to"]) == ("gemma3", "smollm2")  # ran after, from where g1 ended
    assert b["id"] > g1["id"]
    assert loaded_models(server) == ["smollm2"]


def test_unknown_switch_target_is_404(switch_server: HotmodelProcess) -> None:
    resp = httpx.post(switch_server.base_url + "/admin/switch", json={"model": "nope"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"
    bad = httpx.post(switch_server.base_url + "/admin/switch", content=b"{")
    assert bad.status_code == 400
    # the alias names the active model, as on /v1: a no-op, kept out of the history
    before = httpx.get(switch_server.base_url + "/admin/switches").json()["data"]
    same = httpx.post(switch_server.base_url + "/admin/switch", json={"model": "active"})
    assert same.status_code == 200 and same.json()["outcome"] == "already_active"
    assert httpx.get(switch_server.base_url + "/admin/switches").json()["data"] == before


def test_cli_switch_shows_phases_and_exit_codes(on_smollm2: HotmodelProcess) -> None:
    server = on_smollm2
    out = run_hotmodel("switch", "gemma3", "--config", str(server.config), timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for phase in ("drain", "unload", "load"):
        assert any(line.strip().startswith(phase) and " done " in line for line in lines), lines
    # this llama-server is a CPU-only build: no device memory to wait for
    unload = next(line for line in lines if line.strip().startswith("unload"))
    assert "its process exits while the next model loads" in unload, lines
    assert any(line.strip().startswith("settle") and "skipped" in line for line in lines)
    assert "switched smollm2 -> gemma3 in" in out.stdout
    assert "GPU memory: no GPU visible" in out.stdout
    failed = run_hotmodel("switch", "broken", "--config", str(server.config), timeout=120)
    assert failed.returncode == 1
    assert "switch gemma3 -> broken FAILED: model 'broken' failed to load" in failed.stdout
    assert "active model now: gemma3 (rolled back)" in failed.stdout
    assert "--- llama-server log tail ---" in failed.stdout
    unknown = run_hotmodel("switch", "nope", "--config", str(server.config))
    assert unknown.returncode == 1
    assert "'nope' is not a preset" in unknown.stderr


def stream_in_background(
    server: HotmodelProcess, max_tokens: int
) -> tuple[threading.Thread, list[str]]:
    """Start a long streamed generation; returns once its first event arrived. The
    list fills with each event's data (``[DONE]`` last) until the thread ends."""
    events: list[str] = []
    started = threading.Event()
    reader = threading.Thread(target=_long_stream, args=(server, events, started, max_tokens))
    reader.start()
    assert started.wait(30)
    return reader, events


def _long_stream(
    server: HotmodelProcess, events: list[str], started: threading.Event, max_tokens: int
) -> None:
    body = {
        "model": "active",
        "messages": HELLO,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", server.base_url + "/v1/chat/completions", json=body, timeout=120
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()


def test_drain_timeout_fails_the_switch_by_default(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    with two_models(tmp_path, real_models, server="switch_drain_timeout_seconds = 0.3") as hp:
        reader, events = stream_in_background(hp, 400)
        status, report = switch(hp, "gemma3")
        reader.join(600)  # a busy machine generates slowly: the stream's end, not a clock
        assert not reader.is_alive()
        assert status == 409  # nothing changed: a conflict with work in progress, not a fault
        assert "still running after 0.3s" in report["error"]
        assert report["failed_phase"] == "drain"
        assert report["active_after"] == "smollm2" and not report["rolled_back"]
        assert events[-1] == "[DONE]"  # the stream was left alone
        assert chat(hp).json()["model"] == "smollm2"


def test_drain_timeout_can_cancel_streams_with_an_sse_error(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    with two_models(
        tmp_path,
        real_models,
        server="switch_drain_timeout_seconds = 0.3",
        extra='drain_timeout_action = "cancel"',
    ) as hp:
        reader, events = stream_in_background(hp, 1500)
        status, report = switch(hp, "gemma3")
        reader.join(600)  # a busy machine generates slowly: the stream's end, not a clock
        assert not reader.is_alive()
        assert status == 200, report
        assert report["cancelled"] == 1
        last = json.loads(events[-1])
        assert last["error"]["code"] == "switch_cancelled"
        assert "switching 'smollm2' -> 'gemma3'" in last["error"]["message"]
        assert chat(hp).json()["model"] == "gemma3"


def test_auto_switch_on_a_request_for_another_preset(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    with two_models(tmp_path, real_models, extra="auto = true") as hp:
        answer = chat(hp, "gemma3")
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "gemma3"
        history = httpx.get(hp.base_url + "/admin/switches").json()["data"]
        # newest first; the first load at start is a command of the control loop too
        assert [(r["from"], r["to"], r["outcome"]) for r in history] == [
            ("smollm2", "gemma3", "ok"),
            (None, "smollm2", "ok"),
        ]
        assert chat(hp, "nope").status_code == 404


def test_auto_switch_requests_for_both_models_are_each_answered_by_their_model(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    """A request for one model, then, once the switch it causes has begun, one for the
    other: each one is answered by the model it named. (The first used to get
    a 409 "not active": its switch finished, but the second's switch back closed the gate
    before it got in.)"""
    with two_models(tmp_path, real_models, extra="auto = true") as hp:

        def ask(model: str) -> tuple[int, str]:
            resp = chat(hp, model, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
            return resp.status_code, resp.json().get("model") or resp.text

        got: list[tuple[int, str]] = []
        with ThreadPoolExecutor(max_workers=2) as pool:
            for active, other in (("smollm2", "gemma3"), ("gemma3", "smollm2")):
                switches = len(_history(hp))
                first = pool.submit(ask, other)
                wait_until(f"the switch to {other} to begin", partial(_begun, hp, other, switches))
                second = pool.submit(ask, active)
                got += [first.result(), second.result()]
        assert got == [(200, "gemma3"), (200, "smollm2"), (200, "smollm2"), (200, "gemma3")]


def _begun(hp: HotmodelProcess, model: str, switches_before: int) -> bool:
    """A switch to ``model`` runs, or one more has ended since, or none is needed: the
    request for ``model`` is under way."""
    switch = hp.status()["switch"]
    assert isinstance(switch, dict)
    if switch["active"] == model and switch["current"] is None:
        return True
    return _switching_to(hp) == model or len(_history(hp)) > switches_before


def _history(hp: HotmodelProcess) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(hp.base_url + "/admin/switches").json()["data"]
    return data


def _state(hp: HotmodelProcess) -> str:
    switch = hp.status()["switch"]
    assert isinstance(switch, dict)
    return str(switch["state"])


def _switching_to(hp: HotmodelProcess) -> str | None:
    """The model the running command brings in (None: none runs)."""
    switch = hp.status()["switch"]
    assert isinstance(switch, dict)
    current = switch["current"]
    return None if current is None else str(current["to"])


def test_overlap_policy_loads_the_target_before_unloading(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    with two_models(
        tmp_path, real_models, router="models_max = 2", extra='policy = "overlap"'
    ) as hp:
        status, report = switch(hp, "gemma3")
        assert status == 200, report
        assert report["policy"] == "overlap"
        assert list(report["phases"]) == ["check", "load", "drain", "unload"]
        assert loaded_models(hp) == ["gemma3"]
        assert chat(hp).json()["model"] == "gemma3"


def test_requests_past_the_queue_bound_get_503_with_retry_after(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    with two_models(tmp_path, real_models, extra="queue_timeout_seconds = 0.05") as hp:
        with ThreadPoolExecutor(max_workers=2) as pool:
            switching = pool.submit(switch, hp, "gemma3")
            deadline = time.monotonic() + 10
            while hp.status()["switch"]["state"] in ("idle", "draining"):  # type: ignore[index]
                assert time.monotonic() < deadline, "the switch never started"
                time.sleep(0.005)
            refused = chat(hp)
            assert switching.result()[0] == 200
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        err = refused.json()["error"]
        assert err["code"] == "switch_in_progress"
        assert "queue_timeout_seconds" in err["message"]
        assert chat(hp).json()["model"] == "gemma3"
