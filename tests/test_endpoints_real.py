"""The inference endpoints besides chat, against the real llama-server and the real models:
real clients (openai-python), each answer beside the bare router's (field by field),
a resident embedding model used between chat turns with no switch, bad input as
4xx, and a stream whose client leaves stopped upstream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import (
    HotmodelProcess,
    assert_same_shape,
    released_tokens,
    run_hotmodel,
    serving_hotmodel,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

EMBED = "smollm2-embed"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, real_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    """SmolLM2 (default) and Gemma switched, the SmolLM2 file as a resident embedding
    model beside them (as configs/demo.ini has it), auto switching on."""
    folder = tmp_path_factory.mktemp("endpoints")
    config = write_config(
        folder,
        {"smollm2": real_models["smollm2"], "gemma3": real_models["gemma3"]},
        "smollm2",
        extra="auto = true",
    )
    with (folder / "models.ini").open("a", encoding="utf-8") as ini:
        ini.write(
            f"[{EMBED}]\nmodel = {real_models['smollm2']}\nembeddings = true\n"
            "pooling = mean\nresident = true\n"
        )
    with serving_hotmodel(config) as hp:
        yield hp


def _router(server: HotmodelProcess) -> tuple[str, dict[str, str]]:
    router = server.status()["router"]
    assert isinstance(router, dict)
    return str(router["url"]), server.router_auth()


def _both(server: HotmodelProcess, path: str, body: dict[str, Any]) -> tuple[Any, Any]:
    """hotmodel's answer and the bare router's to the same request (the router needs the
    model named: hotmodel names it for the native endpoints)."""
    ours = httpx.post(server.base_url + path, json=body, timeout=120)
    assert ours.status_code == 200, (path, ours.text)
    url, auth = _router(server)
    named = {**body, "model": body.get("model", "smollm2")}
    bare = httpx.post(url + path, json=named, headers=auth, timeout=120)
    assert bare.status_code == 200, (path, bare.text)
    return ours.json(), bare.json()


# Values that differ between two runs of the same request.
_VOLATILE = {"id", "created", "timings", "t_load", "generation_settings", "id_slot"}


GREEDY = {"temperature": 0, "seed": 1, "cache_prompt": False}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4, **GREEDY}),
        ("/completion", {"prompt": "The capital of France is", "n_predict": 4, **GREEDY}),
        ("/tokenize", {"content": "hello world", "with_pieces": True}),
        ("/detokenize", {"tokens": [28120, 905]}),
        ("/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/embeddings", {"model": EMBED, "input": ["hello", "world"]}),
        ("/embeddings", {"model": EMBED, "content": "hello"}),
        ("/embedding", {"model": EMBED, "content": "hello"}),  # the legacy name
        ("/tokenize", {"model": EMBED, "content": "hello"}),
    ],
)
def test_each_answer_has_the_bare_servers_shape(
    server: HotmodelProcess, path: str, body: dict[str, Any]
) -> None:
    ours, bare = _both(server, path, body)
    assert_same_shape(ours, bare, _VOLATILE, where=path)


def test_openai_completions_plain_and_stream(server: HotmodelProcess) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    reply = client.completions.create(model="active", prompt="Once upon a time", max_tokens=8)
    assert reply.model == "smollm2" and reply.object == "text_completion"
    assert reply.choices[0].text and reply.usage is not None
    assert reply.usage.completion_tokens > 0
    parts = [
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="smollm2", prompt="Once upon a time", max_tokens=8, stream=True
        )
        if chunk.choices
    ]
    assert "".join(parts)


def test_openai_embeddings_between_two_chat_turns_cause_no_switch(
    server: HotmodelProcess,
) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    switches = len(httpx.get(server.base_url + "/admin/switches", timeout=10).json()["data"])
    hello = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="smollm2", messages=hello, max_tokens=2)  # type: ignore[arg-type]
    vectors = client.embeddings.create(model=EMBED, input=["a cat", "a dog"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 576  # SmolLM2's width
    client.chat.completions.create(model="smollm2", messages=hello, max_tokens=2)  # type: ignore[arg-type]
    after = httpx.get(server.base_url + "/admin/switches", timeout=10).json()["data"]
    assert len(after) == switches  # nothing was switched
    assert server.status()["active_model"] == "smollm2"


def test_models_list_each_models_endpoints(server: HotmodelProcess) -> None:
    data = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models").json()["data"]}
    assert data[EMBED]["resident"] is True and "/v1/embeddings" in data[EMBED]["endpoints"]
    assert "/v1/chat/completions" not in data[EMBED]["endpoints"]
    assert {"/v1/completions", "/infill", "/tokenize"} <= set(data["smollm2"]["endpoints"])
    shown = run_hotmodel("models", "--config", str(server.config))
    assert shown.returncode == 0 and EMBED in shown.stdout, shown.stdout + shown.stderr


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/completions", {"prompt": 7}, 400, "invalid_request"),
        ("/completion", {}, 400, "invalid_request"),
        ("/infill", {"input_prefix": "def f():"}, 400, "invalid_request"),
        # SmolLM2 has no fill-in-the-middle tokens: llama-server's 501 is the client's 400
        ("/infill", {"input_prefix": "a", "input_suffix": "b"}, 400, "unsupported_endpoint"),
        ("/tokenize", {"content": {"x": 1}}, 400, "invalid_request"),
        ("/detokenize", {"tokens": ["a"]}, 400, "invalid_request"),
        # an id past the vocabulary: llama-server's 500 is the client's 400 (the fuzzer's)
        ("/detokenize", {"tokens": [10_000_000]}, 400, "invalid_tokens"),
        ("/apply-template", {"messages": []}, 400, "invalid_request"),
        ("/v1/embeddings", {"input": "x"}, 400, "unsupported_endpoint"),  # the chat model
        ("/v1/embeddings", {"model": EMBED}, 400, "invalid_request"),
        ("/v1/rerank", {"model": EMBED, "query": "q", "documents": ["d"]}, 400, None),
        ("/rerank", {"query": "q"}, 400, "invalid_request"),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model_not_found"),
        ("/tokenize", {"model": "nope", "content": "x"}, 404, "model_not_found"),
    ],
)
def test_bad_input_is_a_clear_4xx(
    server: HotmodelProcess, path: str, body: dict[str, Any], status: int, code: str | None
) -> None:
    resp = httpx.post(server.base_url + path, json=body, timeout=60)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert code is None or error["code"] == code, error
    not_json = httpx.post(
        server.base_url + path, content=b"{", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400


def test_switching_still_works_after_an_unknown_model(server: HotmodelProcess) -> None:
    assert (
        httpx.post(server.base_url + "/completion", json={"model": "x", "prompt": "a"}).status_code
        == 404
    )
    reply = httpx.post(
        server.base_url + "/completion",
        json={"model": "gemma3", "prompt": "Hello", "n_predict": 2},
        timeout=120,
    )
    assert reply.status_code == 200 and reply.json()["model"] == "gemma3", reply.text
    assert server.status()["active_model"] == "gemma3"
    back = httpx.post(
        server.base_url + "/v1/completions",
        json={"model": "smollm2", "prompt": "Hello", "max_tokens": 2},
        timeout=120,
    )
    assert back.status_code == 200 and back.json()["model"] == "smollm2"


def test_a_client_that_leaves_a_stream_stops_it_upstream(server: HotmodelProcess) -> None:
    """llama-server's own log says it: the task is cancelled, and the slot released well
    before the 2000 tokens asked for (/slots is no witness: it answers between decoding
    steps, and may show the slot idle while the stream starts)."""
    log = server.config.parent / "state" / "llama-server.log"
    offset = log.stat().st_size
    body = {"model": "smollm2", "prompt": "Count: 1, 2, 3,", "n_predict": 2000, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream("POST", server.base_url + "/completion", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # kept referenced: dropping it would close the response
        data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert len(data) == 3  # generating
        resp.close()  # the client goes away mid-stream
    held = wait_until(
        "the task's cancel in llama-server's log", lambda: released_tokens(log, offset)
    )
    assert held < 2000, held
    assert wait_until("no request in flight", lambda: server.status()["in_flight"] == 0)
