"""``GET /metrics`` and the access log of a real hotmodel on the real llama-server.

/metrics is parsed with Prometheus' own text parser before and after real
traffic (plain, streamed and session chats, a bad request, an unknown path,
a failed and a good switch), and the counters must move by exactly what that
traffic did: tokens as llama-server reported them in ``usage``, cache hits,
one time-to-first-token per stream, one phase observation per switch phase.
The access log is read from the server's own output, in JSON, and matched to
the ``X-Request-Id`` each answer carried.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HELLO, HotmodelProcess, Serve, chat, keys, start_hotmodel, write_config

pytestmark = pytest.mark.slow  # drives the real llama-server

ADMIN = "admin-key-metrics-000000"
CLIENT = "client-key-metrics-00000"
LOG_DEADLINE_S = 10.0  # the access line is written just after the answer is sent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(hp: HotmodelProcess, headers: dict[str, str] | None = None) -> Samples:
    resp = httpx.get(hp.base_url + "/metrics", headers=headers or {}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return val(after, name, **labels) - val(before, name, **labels)


def stream_chat(hp: HotmodelProcess) -> dict[str, Any]:
    """A streamed chat asking for usage; returns the usage of its last chunk."""
    body = {
        "model": "active",
        "messages": HELLO,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict[str, Any] | None = None
    url = hp.base_url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None
    return usage


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    real_models: dict[str, Path],
    tiny_models: dict[str, Path],
    llama_server: Path,
) -> Iterator[HotmodelProcess]:
    """SmolLM2 (default), Gemma and a file that is no GGUF; JSON logs."""
    folder = tmp_path_factory.mktemp("metrics")
    presets = {
        "smollm2": real_models["smollm2"],
        "gemma3": real_models["gemma3"],
        "garbage": tiny_models["garbage"],
    }
    hp = start_hotmodel(write_config(folder, presets, "smollm2", server='log_format = "json"'))
    yield hp
    assert hp.stop() == 0, hp.output()


def test_request_and_token_counters_move(served: HotmodelProcess) -> None:
    before = scrape(served)
    assert val(before, "hotmodel_active_model", model="smollm2") == 1
    assert val(before, "hotmodel_active_model", model="gemma3") == 0
    # the first load at start happened before the app existed, and is counted
    assert val(before, "hotmodel_switches_total", outcome="ok", policy="zero_overlap") >= 1
    usages = []
    for _ in range(2):  # the same prompt twice: the second hits llama-server's prompt cache
        resp = chat(served)
        assert resp.status_code == 200, resp.text
        usages.append(resp.json()["usage"])
    usages.append(stream_chat(served))
    resp = chat(served, headers={"x-session-id": "metrics-s1"})
    assert resp.status_code == 200, resp.text
    usages.append(resp.json()["usage"])
    assert chat(served, messages=None).status_code == 400  # never reaches llama-server
    assert httpx.get(served.base_url + "/no/such/path/123").status_code == 404
    assert httpx.get(served.base_url + "/v1/sessions/metrics-s1").status_code == 200
    after = scrape(served)

    def moved(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    route = "/v1/chat/completions"
    assert moved("hotmodel_requests_total", route=route, method="POST", status="200") == 4
    assert moved("hotmodel_requests_total", route=route, method="POST", status="400") == 1
    assert moved("hotmodel_requests_total", route="other", method="GET", status="404") == 1
    session_route = "/v1/sessions/{session_id:path}"
    assert moved("hotmodel_requests_total", route=session_route, method="GET", status="200") == 1
    assert moved("hotmodel_requests_total", route="/metrics", method="GET", status="200") == 1
    assert moved("hotmodel_request_duration_seconds_count", route=route) == 5
    assert moved("hotmodel_upstream_duration_seconds_count") == 4
    assert moved("hotmodel_request_overhead_seconds_count") == 4
    assert moved("hotmodel_upstream_duration_seconds_sum") > 0
    assert moved("hotmodel_time_to_first_token_seconds_count", model="smollm2") == 1
    # exactly what llama-server reported, answer by answer
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert moved("hotmodel_prompt_tokens_total", model="smollm2") == prompt
    assert moved("hotmodel_completion_tokens_total", model="smollm2") == completion
    assert moved("hotmodel_prompt_cached_tokens_total", model="smollm2") == cached
    assert cached > 0  # the repeated prompt came from the cache
    # gauges read at scrape time
    assert val(after, "hotmodel_sessions") >= 1
    assert val(after, "hotmodel_sessions_busy") == 0
    assert val(after, "hotmodel_requests_in_flight") == 0
    assert val(after, "hotmodel_router_up") == 1
    assert ("hotmodel_router_restarts_total", frozenset()) in after
    assert val(after, "hotmodel_uptime_seconds") > val(before, "hotmodel_uptime_seconds")
    assert val(after, "hotmodel_switch_state", state="idle") == 1
    if served.status()["gpu_probe"] == "none":
        assert not [name for name, _ in after if name.startswith("hotmodel_gpu_")]


def test_switch_counters_and_phase_histograms_move(served: HotmodelProcess) -> None:
    before = scrape(served)
    switch = served.base_url + "/admin/switch"
    failed = httpx.post(switch, json={"model": "garbage"}, timeout=120)
    assert failed.status_code == 502 and failed.json()["outcome"] == "failed"
    good = httpx.post(switch, json={"model": "gemma3"}, timeout=120)
    assert good.status_code == 200, good.text
    report = good.json()
    after = scrape(served)

    def moved(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    assert moved("hotmodel_switches_total", outcome="failed", policy="zero_overlap") == 1
    assert moved("hotmodel_switches_total", outcome="ok", policy="zero_overlap") == 1
    assert moved("hotmodel_switch_duration_seconds_count", outcome="ok") == 1
    assert moved("hotmodel_switch_duration_seconds_sum", outcome="ok") > 0
    assert moved("hotmodel_switch_phases_total", phase="check", status="failed") == 1
    assert {"drain", "unload", "load"} <= set(report["phases"])
    for phase, ms in report["phases"].items():
        assert moved("hotmodel_switch_phase_duration_seconds_count", phase=phase) == 1, phase
        assert moved("hotmodel_switch_phases_total", phase=phase, status="done") == 1, phase
        assert moved("hotmodel_switch_phase_duration_seconds_sum", phase=phase) == pytest.approx(
            ms / 1000
        )
    assert val(after, "hotmodel_active_model", model="gemma3") == 1
    assert val(after, "hotmodel_active_model", model="smollm2") == 0
    # a load's progress events are not phases that ended (the documented statuses only)
    statuses = {
        dict(labels)["status"] for name, labels in after if name == "hotmodel_switch_phases_total"
    }
    assert statuses <= {"done", "failed", "skipped"}, statuses


def _json_lines(hp: HotmodelProcess) -> list[dict[str, Any]]:
    lines = [line for line in hp.output().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line, uvicorn's too, is JSON


def _wait_for(hp: HotmodelProcess, found: Callable[[list[dict[str, Any]]], bool]) -> None:
    deadline = time.monotonic() + LOG_DEADLINE_S
    while not found(_json_lines(hp)):
        assert time.monotonic() < deadline, hp.output()[-4000:]
        time.sleep(0.05)


def test_json_access_line_per_request_with_the_returned_request_id(
    served: HotmodelProcess,
) -> None:
    resp = chat(served, headers={"x-request-id": "trace.42-a", "x-session-id": "logged"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == "trace.42-a"
    usage = resp.json()["usage"]
    unsafe = chat(served, headers={"x-request-id": "two words"}, messages=None)
    assert unsafe.status_code == 400
    fresh = unsafe.headers["x-request-id"]
    assert fresh != "two words" and len(fresh) == 16

    def access(lines: list[dict[str, Any]], rid: str) -> list[dict[str, Any]]:
        return [x for x in lines if x["logger"] == "hotmodel.access" and x["request_id"] == rid]

    _wait_for(served, lambda lines: bool(access(lines, fresh)))
    lines = _json_lines(served)
    [line] = access(lines, "trace.42-a")
    assert line["level"] == "info" and line["time"]
    assert line["message"] == "POST /v1/chat/completions 200"
    assert line["method"] == "POST" and line["path"] == line["route"] == "/v1/chat/completions"
    assert line["status"] == 200
    assert line["model"] == served.status()["active_model"]
    assert line["session"] == "logged"
    assert 0 < line["upstream_ms"] <= line["ms"]
    assert line["ttft_ms"] is None  # not a stream
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["completion_tokens"] == usage["completion_tokens"]
    assert line["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    [bad] = access(lines, fresh)
    assert bad["status"] == 400 and bad["upstream_ms"] is None and bad["prompt_tokens"] is None
    assert any(x["logger"].startswith("uvicorn") for x in lines)  # uvicorn's own, as JSON


@pytest.fixture(scope="module")
def secured(serve_module: Serve, tiny_models: dict[str, Path]) -> HotmodelProcess:
    """With API keys, text logs (the default)."""
    return serve_module(
        {"tiny": tiny_models["tiny"]}, "tiny", tail=keys(api=[CLIENT], admin=[ADMIN])
    )


def test_metrics_needs_the_admin_key_when_keys_are_set(secured: HotmodelProcess) -> None:
    url = secured.base_url + "/metrics"
    assert httpx.get(url).status_code == 401
    client = httpx.get(url, headers={"authorization": f"Bearer {CLIENT}"})
    assert client.status_code == 403
    samples = scrape(secured, {"authorization": f"Bearer {ADMIN}"})
    labels = {"route": "/metrics", "method": "GET"}
    assert val(samples, "hotmodel_requests_total", **labels, status="401") == 1
    assert val(samples, "hotmodel_requests_total", **labels, status="403") == 1


def test_text_access_line_carries_the_request_id(secured: HotmodelProcess) -> None:
    resp = httpx.get(secured.base_url + "/health", headers={"x-request-id": "text-line-1"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "text-line-1"
    wanted = "request_id=text-line-1 method=GET path=/health route=/health status=200 model=-"
    deadline = time.monotonic() + LOG_DEADLINE_S
    while wanted not in secured.output():
        assert time.monotonic() < deadline, secured.output()[-4000:]
        time.sleep(0.05)
    [line] = [x for x in secured.output().splitlines() if wanted in x]
    assert " INFO hotmodel.access: " in line
