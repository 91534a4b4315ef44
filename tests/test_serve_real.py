"""End to end: `hotmodel serve` on the real llama-server router with the real SmolLM2.

Every request goes through the proxy to a real model; assertions are on what
a client sees (status, body shape, streaming) and on what the router reports.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.conftest import HotmodelProcess, released_tokens, run_hotmodel, wait_until

pytestmark = pytest.mark.slow  # drives the real llama-server

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def _router_url(server: HotmodelProcess) -> str:
    router = server.status()["router"]
    assert isinstance(router, dict)
    return str(router["url"])


def _slots_busy(server: HotmodelProcess) -> bool:
    slots = httpx.get(
        _router_url(server) + "/slots",
        params={"model": "smollm2"},
        headers=server.router_auth(),
        timeout=5,
    )
    assert slots.status_code == 200, slots.text
    return any(s.get("is_processing") for s in slots.json())


def _assert_openai_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    return dict(err)


def test_openai_client_plain(smol_server: HotmodelProcess) -> None:
    client = openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="active",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=16,
    )
    assert reply.model == "smollm2"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_openai_client_stream(smol_server: HotmodelProcess) -> None:
    client = openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="smollm2",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=16,
        stream=True,
    )
    parts: list[str] = []
    finish = None
    for chunk in stream:
        assert isinstance(chunk, ChatCompletionChunk)
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len(parts) >= 3
    assert "".join(parts).strip()
    assert finish in ("stop", "length")


@pytest.mark.parametrize("model", [None, "active", "smollm2"])
def test_model_may_be_omitted_active_or_the_active_id(
    smol_server: HotmodelProcess, model: str | None
) -> None:
    body: dict[str, Any] = {"messages": HELLO, "max_tokens": 2}
    if model is not None:
        body["model"] = model
    resp = httpx.post(smol_server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "smollm2"


def test_stream_is_relayed_while_the_generation_runs(smol_server: HotmodelProcess) -> None:
    """The first chunks reach the client while the router is still generating."""
    body = {
        "model": "active",
        "messages": HELLO,
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[bytes] = []
    busy_after_first = None
    with httpx.stream(
        "POST", smol_server.base_url + "/v1/chat/completions", json=body, timeout=120
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line.encode())
            if len(events) == 3:
                busy_after_first = _slots_busy(smol_server)
    assert busy_after_first is True, "3 chunks arrived only after the generation ended"
    assert events[-1] == b"data: [DONE]"
    assert len(events) > 100


def test_client_disconnect_stops_the_upstream_generation(smol_server: HotmodelProcess) -> None:
    log = smol_server.config.parent / "state" / "llama-server.log"
    offset = log.stat().st_size
    body = {
        "model": "active",
        "messages": HELLO,
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", smol_server.base_url + "/v1/chat/completions", json=body, timeout=120
    ) as resp:
        lines = resp.iter_lines()  # kept referenced: dropping it would close the response
        data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert len(data) == 3
        assert _slots_busy(smol_server)
        resp.close()  # the client goes away mid-stream
    # llama-server cancels the task and releases the slot well before its 1500 tokens
    held = wait_until(
        "the task's cancel in llama-server's log", lambda: released_tokens(log, offset)
    )
    assert held < 1500, held
    assert not _slots_busy(smol_server)


def test_malformed_json_is_400(smol_server: HotmodelProcess) -> None:
    resp = httpx.post(
        smol_server.base_url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    err = _assert_openai_error(resp, 400, "invalid_request")
    assert "not valid JSON" in err["message"]
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "active"}, "messages"),
        ({"model": "active", "messages": []}, "messages"),
        ({"model": "active", "messages": "hi"}, "messages"),
        ({"messages": HELLO, "stream": "yes"}, "stream"),
    ],
)
def test_bad_fields_are_400(smol_server: HotmodelProcess, body: dict[str, Any], param: str) -> None:
    resp = httpx.post(smol_server.base_url + "/v1/chat/completions", json=body)
    assert _assert_openai_error(resp, 400, "invalid_request")["param"] == param


def test_body_that_is_not_an_object_is_400(smol_server: HotmodelProcess) -> None:
    resp = httpx.post(smol_server.base_url + "/v1/chat/completions", json=[1, 2])
    _assert_openai_error(resp, 400, "invalid_request")


def test_unknown_model_is_404(smol_server: HotmodelProcess) -> None:
    resp = httpx.post(
        smol_server.base_url + "/v1/chat/completions",
        json={"model": "no-such-model", "messages": HELLO},
    )
    err = _assert_openai_error(resp, 404, "model_not_found")
    assert err["param"] == "model"
    assert "no-such-model" in err["message"]


def test_a_request_for_another_preset_is_409_without_auto_switch(
    smol_server: HotmodelProcess,
) -> None:
    resp = httpx.post(
        smol_server.base_url + "/v1/chat/completions", json={"model": "gemma3", "messages": HELLO}
    )
    err = _assert_openai_error(resp, 409, "model_not_active")
    assert "gemma3" in err["message"] and "smollm2" in err["message"]


def test_openai_client_sees_errors_as_api_errors(smol_server: HotmodelProcess) -> None:
    client = openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=HELLO)  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"


def test_upstream_errors_keep_status_in_openai_shape(smol_server: HotmodelProcess) -> None:
    # llama-server's own extra fields pass through unchecked; it refuses this one
    # itself, and its error comes back in our shape.
    resp = httpx.post(
        smol_server.base_url + "/v1/chat/completions",
        timeout=30,
        json={"messages": HELLO, "max_tokens": 2, "n_probs": "many"},
    )
    assert resp.status_code == 400, resp.text
    err = _assert_openai_error(resp, 400, "upstream_error")
    assert "n_probs" in err["message"]


def test_unknown_route_is_404_in_openai_shape(smol_server: HotmodelProcess) -> None:
    _assert_openai_error(httpx.get(smol_server.base_url + "/v1/nothing"), 404, "not_found")


def test_models_lists_presets_with_status_and_active(smol_server: HotmodelProcess) -> None:
    data = httpx.get(smol_server.base_url + "/v1/models").json()
    by_id = {m["id"]: m for m in data["data"]}
    assert set(by_id) == {"smollm2", "gemma3"}
    assert by_id["smollm2"]["status"] == "loaded" and by_id["smollm2"]["active"] is True
    assert by_id["gemma3"]["status"] == "unloaded" and by_id["gemma3"]["active"] is False
    assert data["active"] == "smollm2"
    client = openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key="unused")
    assert {m.id for m in client.models.list()} == {"smollm2", "gemma3"}
    # OpenAI's "retrieve model": a preset by id, the alias as the active one, else a 404
    assert client.models.retrieve("gemma3").model_dump()["status"] == "unloaded"
    assert client.models.retrieve("active").id == "smollm2"
    missing = httpx.get(smol_server.base_url + "/v1/models/nope")
    assert _assert_openai_error(missing, 404, "model_not_found")["param"] == "model"


def test_health_and_admin_status(smol_server: HotmodelProcess) -> None:
    health = httpx.get(smol_server.base_url + "/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    status = smol_server.status()
    assert status["state"] == "ready"
    assert status["active_model"] == "smollm2"
    router = status["router"]
    assert isinstance(router, dict)
    assert router["state"] == "running"
    assert router["pid"] in smol_server.router_pids
    assert isinstance(router["uptime_seconds"], float) and router["uptime_seconds"] > 0
    assert "--no-models-autoload" in router["argv"]


def test_cli_status_asks_the_running_proxy(smol_server: HotmodelProcess) -> None:
    out = run_hotmodel("status", "--config", str(smol_server.config))
    assert out.returncode == 0, out.stderr
    assert "active model: smollm2" in out.stdout
    assert "state: ready" in out.stdout
    raw = run_hotmodel("status", "--config", str(smol_server.config), "--json")
    assert json.loads(raw.stdout)["active_model"] == "smollm2"


def test_router_log_file_gets_the_router_output(smol_server: HotmodelProcess) -> None:
    router = smol_server.status()["router"]
    assert isinstance(router, dict)
    with open(router["log_file"], encoding="utf-8") as f:
        text = f.read()
    assert "=== hotmodel" in text
    assert "load_model" in text or "loaded" in text


def test_the_chat_path_answers_like_every_other_route(smol_server: HotmodelProcess) -> None:
    """The chat path skips Starlette's router (api/app.py, ChatFirst): its errors, other
    methods on its path and its headers must read exactly as the rest of the app's."""
    url = smol_server.base_url + "/v1/chat/completions"
    err = _assert_openai_error(httpx.get(url), 405, "http_405")
    assert err["message"] == "no route GET /v1/chat/completions"
    bad = httpx.post(url, json={"messages": []}, headers={"x-request-id": "chat-path-1"})
    assert _assert_openai_error(bad, 400, "invalid_request")["param"] == "messages"
    assert bad.headers["x-request-id"] == "chat-path-1"
    assert bad.headers["server-timing"].startswith("hotmodel;dur=")
    wrong = httpx.post(url, json={"model": "nope", "messages": HELLO})
    assert _assert_openai_error(wrong, 404, "model_not_found")["param"] == "model"
    good = httpx.post(url, json={"messages": HELLO, "max_tokens": 2}, timeout=60)
    assert good.status_code == 200, good.text
    timing = good.headers["server-timing"]
    assert timing.startswith("hotmodel;dur=") and ", upstream;dur=" in timing


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/admin/switch"])
def test_a_client_that_leaves_while_sending_its_body_is_no_error(
    smol_server: HotmodelProcess, path: str
) -> None:
    """Half a body, then the connection closes: nothing is answered and nothing is logged
    as an unexpected error (it is a 499 in the access log); the server goes on."""
    host, port = smol_server.base_url.removeprefix("http://").split(":")
    rid = "left-mid-body-" + path.strip("/").replace("/", "-")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 500\r\n"
            + f"X-Request-Id: {rid}\r\n\r\n".encode()
            + b'{"messages": [{"role": "user", '
        )
    deadline = time.monotonic() + 10
    while rid not in smol_server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in smol_server.output().splitlines() if rid in line]
    assert lines and all("499" in line for line in lines), lines
    assert "unexpected error" not in smol_server.output()
    resp = httpx.post(
        smol_server.base_url + "/v1/chat/completions", json={"messages": HELLO}, timeout=60
    )
    assert resp.status_code == 200, resp.text


def raw_exchange(server: HotmodelProcess, raw: bytes) -> bytes:
    """Send ``raw`` on a connection of its own; what comes back until the server closes it."""
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad\x01Header: y\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"\r\nzz\r\n{}\r\n0\r\n\r\n",
    ],
    ids=["request-line", "header", "chunk-size"],
)
def test_bytes_that_are_not_http_get_a_json_400(smol_server: HotmodelProcess, raw: bytes) -> None:
    """uvicorn's parser refuses them before the app sees anything; its answer is in OpenAI's
    error shape like every other, the connection closes, and the server goes on."""
    answer = raw_exchange(smol_server, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "http_400"
    assert "HTTP/1.1" in error["message"]
    assert httpx.get(smol_server.base_url + "/health", timeout=10).status_code == 200


def test_an_http_10_client_gets_a_stream_it_can_read(smol_server: HotmodelProcess) -> None:
    """HTTP/1.0 has no chunks: the stream's end is the connection's close (it came chunked)."""
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    )
    request = (
        f"POST /v1/chat/completions HTTP/1.0\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    answer = raw_exchange(smol_server, request)
    head, _, events = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    assert b"transfer-encoding" not in head.lower()
    assert events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n"), events


def test_headers_over_64_kib_get_a_431(smol_server: HotmodelProcess) -> None:
    resp = httpx.get(smol_server.base_url + "/health", headers={"x-big": "a" * 100_000})
    assert _assert_openai_error(resp, 431, "request_header_too_large")
    assert httpx.get(smol_server.base_url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        ({"model": 1}, [], "model"),
        ({"max_tokens": 2**40}, [], "max_tokens"),
        ({"max_completion_tokens": -2}, [], "max_completion_tokens"),
        ({"n": 2}, [], "n"),
        ({}, [("x-session-id", "a-1"), ("x-session-id", "b-2")], "x-session-id"),
        ({"session_id": "c-3"}, [("x-session-id", "d-4")], "session_id"),
        ({}, [("x-session-id", "")], "session_id"),
    ],
)
def test_what_llama_server_would_misread_is_refused_at_the_door(
    smol_server: HotmodelProcess, body: dict[str, Any], headers: list[tuple[str, str]], param: str
) -> None:
    """Found by a hostile pass on the demo: numbers llama-server reads as 32-bit (2**40
    wrapped round to an odd upstream error), a choice count it does not do, a model that is
    not a string (was a 404), and two different session names in one request (one was
    silently kept)."""
    resp = httpx.post(
        smol_server.base_url + "/v1/chat/completions",
        json={"messages": HELLO, "max_tokens": 2, **body},
        headers=headers,
        timeout=60,
    )
    assert _assert_openai_error(resp, 400, "invalid_request")["param"] == param


def test_http_edges_answer_in_openai_shape(smol_server: HotmodelProcess) -> None:
    url = smol_server.base_url + "/v1/chat/completions"
    resp = httpx.delete(url)
    _assert_openai_error(resp, 405, "http_405")
    assert resp.headers["allow"] == "POST"
    slash = httpx.post(url + "/", json={"messages": HELLO}, headers={"host": "localhost"})
    _assert_openai_error(slash, 404, "not_found")  # not a 307 to the Host it was sent
    rebound = httpx.post(url + "/", json={"messages": HELLO}, headers={"host": "evil.example"})
    _assert_openai_error(rebound, 400, "host_not_allowed")  # nor served under another name
    digits = httpx.post(url, content=b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}")
    err = _assert_openai_error(digits, 400, "invalid_request")
    assert "too many digits" in err["message"] and "sys." not in err["message"]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    no_mmproj = httpx.post(
        url, json={"messages": [{"role": "user", "content": [image]}], "max_tokens": 2}
    )
    assert _assert_openai_error(no_mmproj, 400, "upstream_error")["type"] == (
        "invalid_request_error"
    )
