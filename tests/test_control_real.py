"""One owner for every lifecycle change, tried the way careless and impatient users do,
against the real router and the real models.

Bad requests of every kind, then a switch that must complete at once; two
turns racing on one session; requests queued behind a switch whose replay is
slow. All on real llama-server processes.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotmodel import sse
from tests.conftest import HotmodelProcess, two_models, wait_until

pytestmark = pytest.mark.slow  # drives the real llama-server

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, real_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    with two_models(tmp_path_factory.mktemp("control"), real_models) as hp:
        yield hp


def post(hp: HotmodelProcess, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        hp.base_url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=120,
    )


def switch_streamed(
    hp: HotmodelProcess, model: str, on_phase: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """POST /admin/switch with progress events; calls ``on_phase`` for each, returns the report."""
    report: dict[str, Any] = {}
    with httpx.stream(
        "POST", hp.base_url + "/admin/switch", json={"model": model, "stream": True}, timeout=120
    ) as resp:
        parser = sse.SseParser()
        for chunk in resp.iter_bytes():
            for event in parser.feed(chunk):
                if event.event == "phase":
                    on_phase(event.json())
                elif event.event == "report":
                    report = event.json()
    return report


def in_flight(hp: HotmodelProcess) -> int:
    value = hp.status()["in_flight"]
    assert isinstance(value, int)
    return value


def test_two_concurrent_turns_on_one_session_are_both_stored_in_order(
    server: HotmodelProcess,
) -> None:
    start = threading.Barrier(2)

    def turn(text: str) -> dict[str, Any]:
        start.wait()
        resp = post(
            server,
            {"messages": [{"role": "user", "content": text}], "max_tokens": 3},
            {"x-session-id": "race"},
        )
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(turn, ["First question.", "Second question."]))
    session = httpx.get(server.base_url + "/v1/sessions/race").json()
    messages = session["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert {messages[0]["content"], messages[2]["content"]} == {
        "First question.",
        "Second question.",
    }
    # each answer sits right after its own question, and the later turn was sent
    # with the earlier one in its history (more prompt tokens)
    by_question = {a["choices"][0]["message"]["content"]: a for a in answers}
    assert messages[1]["content"] in by_question and messages[3]["content"] in by_question
    first, second = sorted(answers, key=lambda a: a["usage"]["prompt_tokens"])
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]
    assert in_flight(server) == 0


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "messages": HELLO}, 404, "model"),
        ({"model": 42, "messages": HELLO}, 400, "model"),  # a type error, not a name
        (b"{not json", 400, None),
        (b"[]", 400, None),
        (b"[" * 100_000 + b"]" * 100_000, 400, None),
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": ["hi"]}, 400, "messages[0]"),
        ({"messages": HELLO, "stream": "yes"}, 400, "stream"),
        ({"messages": HELLO, "session_id": 5}, 400, "session_id"),
        ({"messages": HELLO, "session_id": "x" * 500}, 400, "session_id"),
        ({"messages": HELLO, "session_id": "bad-1", "system_prompt": "nope"}, 400, "system_prompt"),
        ({"messages": HELLO, "session_id": "bad-2", "preset": "x"}, 400, "preset"),
        ({"messages": HELLO, "session_id": "会话"}, 400, "session_id"),
        ({"messages": HELLO, "session_id": "a b"}, 400, "session_id"),
        ({"messages": [{"role": 5, "content": "hi"}]}, 400, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            400,
            "messages[0].content[0].text",
        ),
        ({"messages": HELLO, "max_tokens": "many"}, 400, "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    ],
)
def test_bad_requests_are_refused_in_openai_shape(
    server: HotmodelProcess, body: Any, status: int, param: str | None
) -> None:
    resp = post(server, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "Error(" not in error["message"]  # no Python repr leaks


def test_a_request_llama_server_cannot_parse_is_the_clients_400(server: HotmodelProcess) -> None:
    """llama-server answers 500 for tools it cannot parse; the request was at fault."""
    tools = [{"type": "function", "function": {}}]  # no name
    resp = post(server, {"messages": HELLO, "tools": tools, "max_tokens": 2})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and "Failed to parse tools" in error["message"]


def test_a_prompt_no_context_could_hold_is_refused_before_llama_server_reads_it(
    server: HotmodelProcess,
) -> None:
    """llama-server tokenizes it all before it refuses (a 7 MB prompt: 2.3 s here, the
    CPU taken from everyone); no tokenizer makes fewer than a token of 64 characters."""
    text = "hello world, this is a long prompt. " * 20_000  # 720,000 characters
    resp = post(server, {"messages": [{"role": "user", "content": text}], "max_tokens": 1})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    # hotmodel's own answer (llama-server's would be type exceed_context_size_error)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert error["type"] == "invalid_request_error" and "720000 characters" in error["message"]
    # in text parts too
    parts = [{"type": "text", "text": text}]
    assert post(server, {"messages": [{"role": "user", "content": parts}]}).status_code == 400
    # a prompt that may fit is llama-server's to count: its refusal gets OpenAI's code too
    long = post(server, {"messages": [{"role": "user", "content": text[:60_000]}]})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert "exceeds the available context size" in long.json()["error"]["message"]
    assert post(server, {"messages": HELLO, "max_tokens": 1}).status_code == 200


def test_an_oversized_body_is_refused_before_it_is_read(server: HotmodelProcess) -> None:
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # 100 MB announced, nothing sent: the answer comes without waiting for the body
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and "[server] max_body_bytes" in error["message"]
    big = post(server, b'{"messages": [{"role": "user", "content": "' + b"x" * 9_000_000 + b'"}]}')
    assert big.status_code == 413
    assert in_flight(server) == 0


def test_after_bad_and_cancelled_requests_a_switch_completes_at_once(
    server: HotmodelProcess,
) -> None:
    """The regression of issue 8: a refused request left its admission ticket behind,
    and every later switch waited out its whole drain timeout and failed."""
    # refused requests that name a session: none of them may store it
    assert (
        post(server, {"model": "nope", "messages": HELLO, "session_id": "bad-1"}).status_code == 404
    )
    assert post(server, {"messages": HELLO, "session_id": "bad-2", "n": 2}).status_code == 400
    assert post(server, {"messages": "hi", "session_id": "bad-3"}).status_code == 400
    assert post(server, b"{not json").status_code == 400
    assert post(server, {"messages": HELLO, "session_id": ""}).status_code == 400
    # a stream whose client goes away after the first chunk
    body = {"messages": HELLO, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", server.base_url + "/v1/chat/completions", json=body, timeout=60
    ) as resp:
        assert resp.status_code == 200
        next(resp.iter_raw())
    # the rejected session ids left no trace; an accepted one is stored (the check can fail)
    for sid in ("bad-1", "bad-2", "bad-3"):
        assert httpx.get(f"{server.base_url}/v1/sessions/{sid}").status_code == 404
    good = post(server, {"messages": HELLO, "max_tokens": 2, "session_id": "good-1"})
    assert good.status_code == 200, good.text
    assert httpx.get(f"{server.base_url}/v1/sessions/good-1").status_code == 200
    # the relay notices the disconnect and returns its ticket
    wait_until("the dropped stream's ticket returned", lambda: in_flight(server) == 0)

    health_during: list[httpx.Response] = []

    def on_phase(phase: dict[str, Any]) -> None:
        if (phase["phase"], phase["status"]) == ("load", "started"):
            health_during.append(httpx.get(server.base_url + "/health"))

    report = switch_streamed(server, "gemma3", on_phase)
    assert report["outcome"] == "ok", report
    assert report["drained"] == 0 and report["cancelled"] == 0
    # nothing in flight: a ticket left behind would have held the drain until its timeout,
    # and failed the switch there
    assert report["failed_phase"] is None and report["cancelled"] == 0
    # while no model is loaded, /health says so (README: 503 with Retry-After)
    (health,) = health_during
    assert health.status_code == 503 and health.headers["retry-after"]
    assert health.json()["status"] == "switching"
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert post(server, {"messages": HELLO, "max_tokens": 2}).status_code == 200


def test_requests_queued_behind_a_switch_with_a_slow_replay_are_answered(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    """Held requests are admitted once the target is active, not after the replay: a
    replay that outlasts [switch] queue_timeout_seconds must not turn them into 503s.
    The bound is set from this machine's measured load time (a busy machine loads
    slowly too), and the replay must outlast it, or the test proves nothing."""
    words = " ".join(f"item{i} is on shelf {i % 17}." for i in range(180))  # ~1,800 tokens
    with two_models(tmp_path, real_models, extra="queue_timeout_seconds = 3") as hp:
        resp = post(
            hp,
            {"messages": [{"role": "user", "content": words}], "max_tokens": 1},
            {"x-session-id": "long"},
        )
        assert resp.status_code == 200, resp.text
        first = httpx.post(hp.base_url + "/admin/switch", json={"model": "gemma3"}, timeout=120)
        assert first.json()["outcome"] == "ok"
        # the held requests wait through drain, unload and load: bound them by 3x those
        # phases of this run's first switch, so that only a wait for the replay exceeds it
        phases = first.json()["phases"]
        held_ms = sum(phases.get(k, 0.0) for k in ("check", "drain", "unload", "settle", "load"))
        bound = max(3.0, 3 * held_ms / 1000)
        toml = hp.config.read_text()
        hp.config.write_text(
            toml.replace("queue_timeout_seconds = 3", f"queue_timeout_seconds = {bound:.1f}")
        )
        assert httpx.post(hp.base_url + "/admin/reload", timeout=60).status_code == 200
        results: list[int] = []
        started = threading.Event()

        def queued() -> None:
            started.wait()
            results.append(post(hp, {"messages": HELLO, "max_tokens": 2}).status_code)

        threads = [threading.Thread(target=queued) for _ in range(3)]
        for t in threads:
            t.start()

        def on_phase(phase: dict[str, Any]) -> None:
            if phase["phase"] == "drain":
                started.set()  # the gate is closed: these requests wait for the switch

        report = switch_streamed(hp, "smollm2", on_phase)
        for t in threads:
            t.join(300)
        assert report["outcome"] == "ok", report
        assert report["replay"]["session"] == "long"
        # the premise: the replay alone outlasted the bound the held requests had
        assert report["phases"]["replay"] > bound * 1000, (report["phases"], bound)
        assert results == [200, 200, 200]
