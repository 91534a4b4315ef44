"""OpenAI Responses with conversation state against the real llama-server and the real
models, through openai-python: plain and streamed, ``previous_response_id`` continuing a
conversation across a switch to Gemma and back and across a restart of hotmodel,
``GET``/``DELETE``/``input_items``, another key's responses out of reach, ``store:
false``, bad input as 4xx, and the plain answer beside the bare router's, field by
field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from hotmodel.router.supervisor import backend_key
from tests.conftest import HotmodelProcess, assert_same_shape, bearer, start_hotmodel, write_config

pytestmark = pytest.mark.slow

KEY_A = "client-key-aaaaaaaaaaaa"
KEY_B = "client-key-bbbbbbbbbbbb"
ADMIN = "admin-key-000000000000"
NAME = "Zorg"
FIRST = f"My name is {NAME}. Remember my name."


def _presets(real_models: dict[str, Path]) -> dict[str, Path]:
    return {"smollm2": real_models["smollm2"], "gemma3": real_models["gemma3"]}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, real_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    """SmolLM2 (default) and Gemma, auto switching on, two client keys."""
    folder = tmp_path_factory.mktemp("responses")
    config = write_config(
        folder,
        _presets(real_models),
        "smollm2",
        extra="auto = true",
        tail=f'[security]\napi_keys = ["{KEY_A}", "{KEY_B}"]\nadmin_keys = ["{ADMIN}"]\n',
    )
    hp = start_hotmodel(config)
    try:
        yield hp
    finally:
        code = hp.stop()
    assert code == 0, hp.output()


def _client(server: HotmodelProcess, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, timeout=180)


def _texts(client: openai.OpenAI, response_id: str) -> list[str]:
    """The text of every input item a stored response was given, oldest first."""
    items = client.responses.input_items.list(response_id, order="asc")
    texts: list[str] = []
    for item in items.data:
        for part in getattr(item, "content", None) or []:
            texts.append(str(getattr(part, "text", "")))
    return texts


def test_plain_stream_and_a_chain_across_a_switch(server: HotmodelProcess) -> None:
    a = _client(server)
    first = a.responses.create(model="smollm2", input=FIRST, temperature=0, max_output_tokens=16)
    assert first.id.startswith("resp_") and first.output_text.strip()
    assert first.previous_response_id is None
    assert a.responses.retrieve(first.id).id == first.id

    # streamed: the Responses events, chunk by chunk; the completed one is stored
    kinds: list[str] = []
    done: Any = None
    with a.responses.create(
        model="smollm2",
        input="What is my name?",
        previous_response_id=first.id,
        temperature=0,
        max_output_tokens=16,
        stream=True,
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.completed":
                done = event.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert done is not None and done.output_text.strip()
    second = a.responses.retrieve(done.id)
    assert second.previous_response_id == first.id and second.output_text == done.output_text
    # the second turn's prompt held the first: its input items are the whole conversation
    texts = _texts(a, second.id)
    assert texts[0] == FIRST and texts[-1] == "What is my name?" and len(texts) == 3
    assert texts[1] == first.output_text

    # across a switch to Gemma and back: the chain comes from hotmodel's store
    third = a.responses.create(
        model="gemma3",
        input="Say my name.",
        previous_response_id=second.id,
        temperature=0,
        max_output_tokens=16,
    )
    assert third.output_text.strip() and third.previous_response_id == second.id
    fourth = a.responses.create(
        model="smollm2",
        input="Once more: my name?",
        previous_response_id=third.id,
        temperature=0,
        max_output_tokens=16,
    )
    assert fourth.output_text.strip()
    texts = _texts(a, fourth.id)
    assert texts[0] == FIRST and len(texts) == 7 and texts[-1] == "Once more: my name?"
    status = httpx.get(server.base_url + "/admin/status", headers=bearer(ADMIN), timeout=10)
    assert status.json()["active_model"] == "smollm2"
    # the chain is a session: the switch back replayed it (no KV snapshots here), as the
    # chat messages llama-server makes of it, so the fourth turn read only what was new
    switches = httpx.get(server.base_url + "/admin/switches", headers=bearer(ADMIN), timeout=10)
    report = switches.json()["data"][0]
    assert report["to"] == "smollm2" and report["replay"]["session"] == f"responses {first.id}"
    usage = fourth.usage
    assert usage is not None and usage.input_tokens_details is not None
    assert usage.input_tokens - usage.input_tokens_details.cached_tokens < 40, usage

    # deleting a middle response keeps the later ones whole
    a.responses.delete(second.id)  # openai-python returns nothing; hotmodel's body says so
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(second.id)
    assert _texts(a, fourth.id) == texts


def test_another_key_store_false_and_bad_input(server: HotmodelProcess) -> None:
    a, b = _client(server), _client(server, KEY_B)
    mine = a.responses.create(model="smollm2", input=FIRST, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.create(
            model="smollm2", input="and?", previous_response_id=mine.id, max_output_tokens=4
        )
    assert a.responses.retrieve(mine.id).id == mine.id  # still there for its owner

    unstored = a.responses.create(model="smollm2", input="hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(unstored.id)

    with pytest.raises(openai.NotFoundError) as unknown:
        a.responses.create(model="smollm2", input="x", previous_response_id="resp_nope")
    assert unknown.value.status_code == 404
    url = server.base_url + "/v1/responses"
    for body, param in (
        ({"input": 5}, "input"),
        ({"input": "x", "previous_response_id": 5}, "previous_response_id"),
        ({"input": "x", "store": "no"}, "store"),
        ({}, "input"),
    ):
        got = httpx.post(url, json=body, headers=bearer(KEY_A), timeout=30)
        assert got.status_code == 400, (body, got.text)
        assert got.json()["error"]["param"] == param
    got = httpx.post(url, json={"input": "x", "model": "nope"}, headers=bearer(KEY_A), timeout=60)
    assert got.status_code == 404 and got.json()["error"]["code"] == "model_not_found"


# Values that differ between two runs of the same request
_VOLATILE = {"id", "created_at", "completed_at", "timings", "usage"}


def test_the_plain_answer_has_the_bare_routers_shape(server: HotmodelProcess) -> None:
    status = httpx.get(server.base_url + "/admin/status", headers=bearer(ADMIN), timeout=10)
    router = status.json()["router"]
    auth = {"authorization": f"Bearer {backend_key(int(router['pid']))}"}
    body = {"model": "smollm2", "input": "Say hi.", "temperature": 0, "max_output_tokens": 8}
    ours = httpx.post(
        server.base_url + "/v1/responses", json=body, headers=bearer(KEY_A), timeout=120
    )
    bare = httpx.post(str(router["url"]) + "/v1/responses", json=body, headers=auth, timeout=120)
    assert ours.status_code == bare.status_code == 200, (ours.text, bare.text)
    mine, theirs = ours.json(), bare.json()
    assert mine.pop("previous_response_id") is None  # the one field hotmodel adds
    assert_same_shape(mine, theirs, _VOLATILE, values=False)
    assert set(mine["usage"]) == set(theirs["usage"])
    # input_tokens: served, and counts the chain
    count = httpx.post(
        server.base_url + "/v1/responses/input_tokens",
        json={"model": "smollm2", "input": "and?", "previous_response_id": mine["id"]},
        headers=bearer(KEY_A),
        timeout=60,
    )
    alone = httpx.post(
        server.base_url + "/v1/responses/input_tokens",
        json={"model": "smollm2", "input": "and?"},
        headers=bearer(KEY_A),
        timeout=60,
    )
    assert count.status_code == alone.status_code == 200, (count.text, alone.text)
    assert count.json()["input_tokens"] > alone.json()["input_tokens"]


def test_a_chain_survives_a_restart(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    config = write_config(tmp_path, _presets(real_models), "smollm2")
    hp = start_hotmodel(config)
    try:
        first = _client(hp).responses.create(input=FIRST, temperature=0, max_output_tokens=8)
    finally:
        assert hp.stop() == 0, hp.output()
    hp = start_hotmodel(config)
    try:
        client = _client(hp)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        second = client.responses.create(
            input="What is my name?",
            previous_response_id=first.id,
            temperature=0,
            max_output_tokens=8,
        )
        assert second.output_text.strip()
        assert _texts(client, second.id) == [FIRST, first.output_text, "What is my name?"]
    finally:
        assert hp.stop() == 0, hp.output()
