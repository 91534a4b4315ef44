"""Anthropic Messages against the real llama-server and the real models, with the real
Anthropic Python SDK: plain (with ``system``, with a tool), streamed, ``count_tokens``,
the answer field by field beside the bare router's, Anthropic-shaped 404 and 401, and a
session by ``X-Session-Id`` that survives a switch to gemma3 and back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import HotmodelProcess, serving_hotmodel, two_models, write_config

pytestmark = pytest.mark.slow

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, real_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    folder = tmp_path_factory.mktemp("messages")
    config = write_config(
        folder,
        {"smollm2": real_models["smollm2"], "gemma3": real_models["gemma3"]},
        "smollm2",
        extra="auto = true",
    )
    with serving_hotmodel(config) as hp:
        yield hp


def _client(server: HotmodelProcess, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, **kw)


def test_plain_system_and_tool_through_the_sdk(server: HotmodelProcess) -> None:
    client = _client(server)
    plain = client.messages.create(
        model="active",
        max_tokens=16,
        system="You answer in one short sentence.",
        messages=[{"role": "user", "content": "Say hello."}],
    )
    assert plain.type == "message" and plain.role == "assistant"
    assert plain.content and plain.content[0].type == "text" and plain.content[0].text
    assert plain.stop_reason in ("end_turn", "max_tokens")
    assert plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0
    tool = client.messages.create(
        model="smollm2",
        max_tokens=24,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    )
    assert tool.type == "message" and tool.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_stream_text_deltas_and_the_final_message(server: HotmodelProcess) -> None:
    client = _client(server)
    with client.messages.stream(
        model="active", max_tokens=12, messages=[{"role": "user", "content": "Count to five."}]
    ) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(deltas) > 1
    assert final.content[0].type == "text" and final.content[0].text == "".join(deltas)
    assert final.stop_reason in ("end_turn", "max_tokens")


def test_count_tokens(server: HotmodelProcess) -> None:
    counted = _client(server).messages.count_tokens(
        model="active", messages=[{"role": "user", "content": "Hello there"}]
    )
    assert counted.input_tokens > 0


def test_the_plain_answer_field_by_field_beside_the_bare_router(server: HotmodelProcess) -> None:
    body = {
        "model": "smollm2",
        "max_tokens": 8,
        "temperature": 0,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Name a colour."}],
    }
    ours = httpx.post(server.base_url + "/v1/messages", json=body, timeout=120)
    assert ours.status_code == 200, ours.text
    router = server.status()["router"]
    assert isinstance(router, dict)
    bare = httpx.post(
        str(router["url"]) + "/v1/messages", json=body, headers=server.router_auth(), timeout=120
    )
    assert bare.status_code == 200, bare.text
    a, b = ours.json(), bare.json()
    assert set(a) == set(b)
    for key in set(a) - {"id", "usage"}:
        assert a[key] == b[key], key
    assert set(a["usage"]) == set(b["usage"])
    assert a["usage"]["output_tokens"] == b["usage"]["output_tokens"]


def test_errors_in_anthropics_shape(server: HotmodelProcess) -> None:
    client = _client(server)
    with pytest.raises(anthropic.NotFoundError) as found:
        client.messages.create(
            model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert found.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": found.value.body["error"]["message"]},  # type: ignore[index]
    }
    bad = httpx.post(
        server.base_url + "/v1/messages",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400
    assert bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"


KEY = "anthropic-client-key-1"


def test_a_missing_key_is_a_401_in_anthropics_shape(
    tmp_path: Path, real_models: dict[str, Path]
) -> None:
    with two_models(tmp_path, real_models, tail=f'[security]\napi_keys = ["{KEY}"]') as hp:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            anthropic.Anthropic(
                base_url=hp.base_url, api_key="wrong", max_retries=0
            ).messages.create(
                model="active", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
        assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        ok = anthropic.Anthropic(base_url=hp.base_url, api_key=KEY, max_retries=0)
        answer = ok.messages.create(
            model="active", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.content[0].type == "text"
        bearer = anthropic.Anthropic(base_url=hp.base_url, auth_token=KEY, max_retries=0)
        assert (
            bearer.messages.count_tokens(
                model="active", messages=[{"role": "user", "content": "hi"}]
            ).input_tokens
            > 0
        )


def test_a_session_survives_a_switch_and_back(server: HotmodelProcess) -> None:
    client = _client(server)
    session = {"X-Session-Id": "anthropic-trip"}
    first = client.messages.create(
        model="smollm2",
        max_tokens=8,
        system="You are a travel agent.",
        messages=[{"role": "user", "content": "I am going to Lisbon."}],
        extra_headers=session,
    )
    assert first.content[0].type == "text"
    stored = httpx.get(server.base_url + "/v1/sessions/anthropic-trip").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]  # `system`: the request's
    assert stored[1]["content"] == first.content[0].text
    # a turn on gemma3 (the auto switch), then back on smollm2, streamed
    second = client.messages.create(
        model="gemma3",
        max_tokens=8,
        messages=[{"role": "user", "content": "Which city?"}],
        extra_headers=session,
    )
    alone = client.messages.count_tokens(
        model="gemma3", messages=[{"role": "user", "content": "Which city?"}]
    )
    # the prompt sent held the first turn: more than the new message alone
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) > (
        alone.input_tokens + 10
    )
    with client.messages.stream(
        model="smollm2",
        max_tokens=8,
        messages=[{"role": "user", "content": "And the weather?"}],
        extra_headers=session,
    ) as stream:
        text = "".join(stream.text_stream)
    stored = httpx.get(server.base_url + "/v1/sessions/anthropic-trip").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"] * 3
    assert stored[0]["content"] == "I am going to Lisbon."  # the later turns saw it
    assert stored[-1]["content"] == text
    assert stored[3]["model"] == "gemma3" and stored[-1]["model"] == "smollm2"
    count = client.messages.count_tokens(
        model="smollm2", messages=[{"role": "user", "content": "x"}]
    )
    assert count.input_tokens > 0
