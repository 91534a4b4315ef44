"""The scheduler against the real router, SmolLM2 and Gemma (issue 21's two judged
scenarios, and its backpressure): requests for another model wait in its queue, one switch
serves the whole queue, and nobody waits past the fairness bound plus one switch."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HotmodelProcess, chat, two_models, wait_until

pytestmark = pytest.mark.slow  # drives the real llama-server

MAX_WAIT_S = 10.0


def queued(hp: HotmodelProcess, model: str) -> int | None:
    """How many requests wait in ``model``'s queue (None: it has none)."""
    queues = httpx.get(hp.base_url + "/admin/status").json()["queues"]
    waiting: int | None = queues.get(model, {}).get("waiting")
    return waiting


def switches(hp: HotmodelProcess) -> list[dict[str, Any]]:
    reports: list[dict[str, Any]] = httpx.get(hp.base_url + "/admin/switches").json()["data"]
    return [r for r in reports if r["outcome"] == "ok" and r["from"] is not None]


def test_two_clients_looping_on_their_own_models_share_switches(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    with two_models(
        tmp_path, real_models, extra=f"auto = true\nmax_wait_seconds = {MAX_WAIT_S}"
    ) as hp:
        before = len(switches(hp))

        def loop(model: str) -> list[int]:
            return [chat(hp, model).status_code for _ in range(6)]

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(loop, ["smollm2", "gemma3"]))
        made = switches(hp)[: len(switches(hp)) - before]
        assert all(code == 200 for run in runs for code in run), runs
        assert len(made) <= 4, [r["reason"] for r in made]
        assert all(r["reason"] for r in made), made  # each says why


def test_a_burst_alternating_between_two_models_costs_one_switch(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    with two_models(tmp_path, real_models, extra="auto = true") as hp:
        before = len(switches(hp))
        models = ["smollm2", "gemma3"] * 6
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda m: chat(hp, m).status_code, models))
        assert all(code == 200 for code in results), results
        made = switches(hp)[: len(switches(hp)) - before]
        assert [r["to"] for r in made] == ["gemma3"], [(r["to"], r["reason"]) for r in made]
        assert made[0]["reason"].startswith(("batch: 6 waiting for gemma3", "max_wait"))
        assert made[0]["expected_ms"] > 0


def test_a_full_queue_answers_429_with_retry_after_and_is_visible(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    # the loaded model stays a minute: waiters for Gemma stay queued
    extra = "auto = true\nmin_resident_seconds = 60\nmax_wait_seconds = 60\nmax_queue = 2"
    with two_models(tmp_path, real_models, extra=extra, server="default_max_tokens = 3") as hp:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(chat, hp, "gemma3") for _ in range(2)]
            wait_until("two waiters in gemma3's queue", lambda: queued(hp, "gemma3") == 2)
            metrics = httpx.get(hp.base_url + "/metrics").text
            assert 'hotmodel_queue_waiting{model="gemma3"} 2.0' in metrics
            full = chat(hp, "gemma3", timeout=30)
            assert full.status_code == 429, full.text
            assert full.json()["error"]["code"] == "queue_full"
            assert int(full.headers["retry-after"]) >= 1
            assert full.headers["x-ratelimit-limit"] == "2"
            assert full.headers["x-ratelimit-waiting"] == "2"
            # the loaded model is served at once meanwhile; a request with no bound of its
            # own gets [server] default_max_tokens
            unbounded = httpx.post(
                hp.base_url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Tell me a long story."}]},
                timeout=60,
            )
            assert unbounded.status_code == 200, unbounded.text
            assert unbounded.json()["usage"]["completion_tokens"] <= 3
            # an admin switch releases the waiters
            switched = httpx.post(
                hp.base_url + "/admin/switch", json={"model": "gemma3"}, timeout=120
            )
            assert switched.status_code == 200, switched.text
            assert [w.result().status_code for w in waiting] == [200, 200]
        assert httpx.get(hp.base_url + "/admin/status").json()["queues"] == {}


def test_a_streaming_waiter_sees_its_place_then_an_answer_the_openai_sdk_parses(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    import openai

    # the loaded model stays a minute: a request for Gemma waits in its queue until the
    # admin switch below
    extra = "auto = true\nmin_resident_seconds = 60\nmax_wait_seconds = 60"
    with two_models(tmp_path, real_models, extra=extra) as hp:
        body = {
            "model": "gemma3",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3,
            "stream": True,
        }
        with httpx.stream(
            "POST", hp.base_url + "/v1/chat/completions", json=body, timeout=120
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = resp.iter_lines()
            first = next(lines)
            assert first.startswith(": queued 1 of 1 for gemma3, waited "), first
            switched = httpx.post(
                hp.base_url + "/admin/switch", json={"model": "gemma3"}, timeout=120
            )
            assert switched.status_code == 200, switched.text
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]", rest
        # the same kind of stream, read by the openai SDK: comments are skipped
        client = openai.OpenAI(base_url=hp.base_url + "/v1", api_key="none", max_retries=0)
        httpx.post(hp.base_url + "/admin/switch", json={"model": "smollm2"}, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(
                lambda: list(
                    client.chat.completions.create(
                        model="gemma3",
                        messages=[{"role": "user", "content": "Hi"}],
                        max_tokens=3,
                        stream=True,
                    )
                )
            )
            wait_until("the SDK's stream in gemma3's queue", lambda: queued(hp, "gemma3") == 1)
            httpx.post(hp.base_url + "/admin/switch", json={"model": "gemma3"}, timeout=120)
            chunks = streamed.result(timeout=120)
        assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].model
        status = httpx.get(hp.base_url + "/admin/status").json()
        # measured by the scheduler's own switches (an admin's are not learnt from)
        assert isinstance(status["load_seconds"], dict)
        assert isinstance(status["replay_seconds"], dict)


def test_no_more_requests_go_upstream_than_the_model_serves(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    """Issue 21's flood: with one slot, 5 concurrent generations put 2 upstream (its slot
    and one queued in llama-server) and hold 3 in hotmodel; all answer."""
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Count to fifty."}],
        "max_tokens": 48,
        "ignore_eos": True,
    }
    with two_models(tmp_path, real_models, router="parallel = 1") as hp:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            sent = [
                pool.submit(
                    httpx.post, hp.base_url + "/v1/chat/completions", json=body, timeout=300
                )
                for _ in range(5)
            ]
            seen: set[int] = set()
            while not all(f.done() for f in sent):
                status = httpx.get(hp.base_url + "/admin/status").json()
                seen.add(status["upstream_waiting"].get("smollm2", 0))
                assert status["in_flight"] <= 5
            answers = [f.result() for f in sent]
        assert [a.status_code for a in answers] == [200] * 5
        assert max(seen) == 3, seen  # 5 - (1 slot + 1 queued in llama-server)
        assert httpx.get(hp.base_url + "/admin/status").json()["upstream_waiting"] == {}
