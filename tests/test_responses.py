"""OpenAI Responses with conversation state (api/responses.py, sessions/responses.py), fast.

The door is driven as a plain ASGI app against a scripted llama-server on a real socket
behind the real ``RouterClient`` (as tests/test_endpoints.py does), with a real store
file: what was sent upstream, what the client got, what was stored, and that the
ticket was returned.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from starlette.applications import Starlette

from hotmodel.api import endpoints as ep
from hotmodel.api.app import HANDLERS
from hotmodel.api.auth import OWNER
from hotmodel.api.responses import Responses, responses_routes
from hotmodel.errors import InvalidRequestError, ResponseNotFoundError
from hotmodel.runtime import Services
from hotmodel.sessions.responses import (
    ResponseRows,
    StoredResponse,
    chain_session,
    chat_messages,
    conversation,
    input_items,
    output_items,
)
from hotmodel.sessions.schema import MIGRATIONS, SCHEMA_VERSION
from hotmodel.sessions.service import SessionRef
from hotmodel.sessions.slots import messages_hash
from hotmodel.sessions.sqlite import SqliteStore
from hotmodel.sessions.store import is_chain
from tests import fakes
from tests.conftest import Stores
from tests.fakes import door_config

# --- the checks (pure) ---


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"input": "hi"}, None),
        ({"input": [{"role": "user", "content": "hi"}], "store": False}, None),
        ({}, "input"),
        ({"input": 5}, "input"),
        ({"input": ["hi"]}, "input[0]"),
        ({"input": "hi", "previous_response_id": 5}, "previous_response_id"),
        ({"input": "hi", "previous_response_id": ""}, "previous_response_id"),
        ({"input": "hi", "store": "yes"}, "store"),
        ({"input": "hi", "instructions": []}, "instructions"),
        ({"input": "hi", "max_output_tokens": "9"}, "max_output_tokens"),
        ({"input": "hi", "tools": {}}, "tools"),
        ({"input": "hi", "tools": [{"name": "f"}]}, "tools[0]"),
        ({"input": "hi", "stream": "yes"}, "stream"),
        ({"input": "hi", "reasoning": "high"}, "reasoning"),
        ({"input": "hi", "parallel_tool_calls": 1}, "parallel_tool_calls"),
    ],
)
def test_each_check_names_the_field(
    payload: dict[str, Any], param: str | None, tmp_path: Path
) -> None:
    config = door_config(tmp_path)
    if param is None:
        ep.check_responses(payload, config)
        return
    with pytest.raises(InvalidRequestError) as caught:
        ep.check_responses(payload, config)
    assert caught.value.param == param


# What Codex 0.171.0 sends (`codex exec`, a provider with wire_api = "responses"), cut down:
# Responses tools (a flat `function`, a `namespace` of functions, `web_search`), developer
# messages, `reasoning`, `include`, `store: false`, `parallel_tool_calls`...
CODEX_REQUEST: dict[str, Any] = {
    "model": "smollm2",
    "instructions": "",
    "input": [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "You are a coding agent."}],
        },
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
    ],
    "tools": [
        {
            "type": "function",
            "name": "exec_command",
            "description": "Runs a command.",
            "strict": False,
            "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
        },
        {"type": "namespace", "name": "multi_agent_v1", "description": "agents", "tools": []},
        {"type": "web_search", "external_web_access": False},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "reasoning": {"summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "01a2503d-0a32-7500-8947-2083fb7fa3e9",
    "client_metadata": {"x-codex-installation-id": "x"},
}


def test_codexs_request_passes_the_checks_and_goes_on_unchanged(tmp_path: Path) -> None:
    """Codex's Responses tools are not chat's (no nested `function`): they pass, and
    every field llama-server takes reaches it as Codex sent it."""
    ep.check_responses(CODEX_REQUEST, door_config(tmp_path))

    async def scenario(s: Services, script: Script, store: ResponseRows) -> None:
        body = {**CODEX_REQUEST, "stream": False, "model": "m"}
        answer = await Client(body).call(s, store)
        assert answer.status == 200, answer.text()
        path, sent = script.got[-1]
        assert path == "/v1/responses"
        for key in ("tools", "reasoning", "include", "store", "parallel_tool_calls", "input"):
            assert sent[key] == body[key], key
        assert await store.get("", answer.json()["id"]) is None  # store: false

    _run(tmp_path, None, scenario)


def test_a_chain_is_each_turns_input_then_its_output() -> None:
    first = input_items("My name is Zorg.")
    assert first == [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "My name is Zorg."}],
        }
    ]
    assert input_items([{"role": "user", "content": "x"}]) == [{"role": "user", "content": "x"}]


def _text(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": [{"text": text, "type": "text"}]}


def test_a_chain_is_the_chat_messages_llama_server_makes_of_it() -> None:
    """As llama-server's convert_responses_to_chatcmpl: instructions a system message,
    text parts, an assistant's text and tool calls joined into one message, a tool
    result a tool message; anything else is not a session's turn."""
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    said = {"type": "message", "role": "assistant", "content": [
        {"type": "output_text", "text": "Calling.", "annotations": []}]}  # fmt: skip
    items = [
        *input_items("Weather?"),
        call,
        said,
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "developer", "content": "Be brief."},
    ]
    assert chat_messages("You help.", items) == [
        {"role": "system", "content": "You help."},
        _text("user", "Weather?"),
        {
            "role": "assistant",
            "tool_calls": [
                {"function": {"arguments": "{}", "name": "f"}, "id": "c1", "type": "function"}
            ],
            "content": [{"text": "Calling.", "type": "text"}],
        },
        {"content": "sunny", "role": "tool", "tool_call_id": "c1"},
        _text("developer", "Be brief."),
    ]
    assert chat_messages(..., []) == []  # no instructions
    assert chat_messages(None, []) == [{"role": "system", "content": ""}]  # null ones
    image = {"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]}
    for odd in (image, {"type": "reasoning", "summary": []}, {"role": "assistant", "content": "x"}):
        assert chat_messages(..., [*input_items("hi"), odd]) is None, odd


def test_a_turns_label_begins_the_next_turns_prompt() -> None:
    """What a stored turn labels the slot with (its input and answer as chat messages) is
    where the chain's next turn begins, as a KV snapshot's proof needs; the session of
    a chain is named by its first response, an id no client can send."""
    first = input_items("My name is Zorg.")
    answer = _answer("resp_1", "Hello Zorg.")
    label = chat_messages("Be kind.", [*first, *output_items(answer)])
    assert label is not None and [m["role"] for m in label] == ["system", "user", "assistant"]
    chain = conversation([_stored("resp_1", first, answer)])
    nxt = chat_messages("Be kind.", [*chain, *input_items("My name?")])
    assert nxt is not None and messages_hash(nxt[: len(label)]) == messages_hash(label)
    session = chain_session("resp_1")
    assert is_chain(session) and not is_chain("resp_1") and " " in session


def _stored(rid: str, items: list[dict[str, Any]], response: dict[str, Any]) -> StoredResponse:
    return StoredResponse(rid, None, "m", items, response, 0.0)


# --- the door, against a scripted llama-server ---


def _answer(rid: str, text: str) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": "msg_" + rid,
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            },
            {"type": "reasoning", "id": "rs_" + rid, "summary": []},  # not taken back
        ],
    }


def _events(rid: str, text: str) -> bytes:
    events = [
        ("response.created", {"type": "response.created", "response": {"id": rid}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": text}),
        ("response.completed", {"type": "response.completed", "response": _answer(rid, text)}),
    ]
    return b"".join(f"event: {e}\ndata: {json.dumps(d)}\n\n".encode() for e, d in events)


class Script(fakes.Script):
    """Responses' answers, each with the next id; a token count."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    async def respond(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        self.n += 1
        rid = f"resp_{self.n}"
        if request.path.endswith("/input_tokens"):
            return web.json_response({"object": "response.input_tokens", "input_tokens": 7})
        if not body.get("stream"):
            return web.json_response(_answer(rid, f"answer {self.n}"))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        data = _events(rid, f"answer {self.n}")
        for at in range(0, len(data), 40):  # events cut across chunks
            await resp.write(data[at : at + 40])
            await asyncio.sleep(0.005)
        await resp.write_eof()
        return resp


class Client(fakes.AsgiClient):
    """A request to the Responses handler (``POST /v1/responses`` unless ``path``)."""

    def __init__(self, body: dict[str, Any], owner: str = "", path: str = "/v1/responses"):
        super().__init__(path, body, owner)

    async def call(self, s: Services, store: ResponseRows) -> Client:
        await Responses(s, self.path, store)(self.scope, self.receive, self.send)
        return self


def _run(
    tmp_path: Path,
    store: Stores | None,
    scenario: Callable[[Services, Script, ResponseRows], Awaitable[None]],
) -> None:
    """``scenario`` on a scripted llama-server, with ``store``'s backend (None: SQLite)."""

    async def with_store(s: Services, script: Script) -> None:
        await scenario(s, script, s.store.responses)

    fakes.run_scripted(
        Script(), with_store, door_config(tmp_path), None if store is None else store()
    )


def test_a_continued_response_gets_its_chain_as_input(tmp_path: Path, store: Stores) -> None:
    async def scenario(s: Services, script: Script, store: ResponseRows) -> None:
        first = (await Client({"input": "My name is Zorg."}).call(s, store)).json()
        assert first["id"] == "resp_1" and first["previous_response_id"] is None
        body = {"input": "What is my name?", "previous_response_id": "resp_1"}
        second = (await Client(body).call(s, store)).json()
        assert second["id"] == "resp_2" and second["previous_response_id"] == "resp_1"
        path, sent = script.got[-1]
        assert path == "/v1/responses" and "previous_response_id" not in sent
        assert sent["model"] == "m" and "max_output_tokens" not in sent
        texts = [
            part["text"] for item in sent["input"] for part in item["content"]
        ]  # turn 1's question, its answer (not its reasoning item), the new question
        assert texts == ["My name is Zorg.", "answer 1", "What is my name?"]
        assert [i["type"] for i in sent["input"]] == ["message"] * 3
        stored = await store.get("", "resp_2")
        assert stored is not None and stored.response == second and stored.model == "m"
        chain = await store.chain("", "resp_2")
        assert chain is not None and [r.id for r in chain] == ["resp_1", "resp_2"]
        # /input_tokens counts the chain too, and stores nothing
        count = await Client(body, path="/v1/responses/input_tokens").call(s, store)
        assert count.json()["input_tokens"] == 7 and len(script.got[-1][1]["input"]) == 3
        assert await store.get("", "resp_3") is None

    _run(tmp_path, store, scenario)


def test_another_keys_or_an_unknown_id_is_a_404_before_anything_is_sent(
    tmp_path: Path, store: Stores
) -> None:
    async def scenario(s: Services, script: Script, store: ResponseRows) -> None:
        await Client({"input": "secret"}, owner="alice").call(s, store)
        sent = len(script.got)
        for owner, rid in (("bob", "resp_1"), ("alice", "resp_nope"), ("", "resp_1")):
            body = {"input": "x", "previous_response_id": rid}
            with pytest.raises(ResponseNotFoundError) as caught:
                await Client(body, owner=owner).call(s, store)
            assert caught.value.param == "previous_response_id"
        assert len(script.got) == sent
        assert await store.get("bob", "resp_1") is None
        assert await store.get("alice", "resp_1") is not None

    _run(tmp_path, store, scenario)


def test_store_false_keeps_nothing(tmp_path: Path, store: Stores) -> None:
    async def scenario(s: Services, script: Script, store: ResponseRows) -> None:
        answer = (await Client({"input": "hi", "store": False}).call(s, store)).json()
        assert answer["id"] == "resp_1" and await store.get("", "resp_1") is None
        with pytest.raises(ResponseNotFoundError):
            await Client({"input": "x", "previous_response_id": "resp_1"}).call(s, store)

    _run(tmp_path, store, scenario)


def test_a_stream_is_relayed_as_it_came_and_stored(tmp_path: Path, store: Stores) -> None:
    async def scenario(s: Services, script: Script, store: ResponseRows) -> None:
        client = await Client({"input": "My name is Zorg.", "stream": True}).call(s, store)
        assert client.status == 200 and client.text() == _events("resp_1", "answer 1").decode()
        assert len([m for m in client.sent if m.get("body")]) >= 2  # chunk by chunk
        stored = await store.get("", "resp_1")
        assert stored is not None and stored.response["previous_response_id"] is None
        body = {"input": "and?", "previous_response_id": "resp_1", "stream": True}
        await Client(body).call(s, store)
        assert len(script.got[-1][1]["input"]) == 3
        assert (await store.get("", "resp_2")) is not None

    _run(tmp_path, store, scenario)


def test_deleting_a_response_keeps_those_that_continued_it_whole(
    tmp_path: Path, store: Stores
) -> None:
    async def scenario(s: Services, script: Script, store: ResponseRows) -> None:
        await Client({"input": "one"}).call(s, store)
        await Client({"input": "two", "previous_response_id": "resp_1"}).call(s, store)
        await Client({"input": "three", "previous_response_id": "resp_2"}).call(s, store)
        before = await store.chain("", "resp_3")
        assert before is not None
        assert await store.delete("", "resp_2") and not await store.delete("", "resp_2")
        after = await store.chain("", "resp_3")
        assert after is not None and [r.id for r in after] == ["resp_1", "resp_3"]
        assert conversation(after) == conversation(before)
        assert await store.get("", "resp_2") is None

    _run(tmp_path, store, scenario)


def test_get_delete_and_input_items(tmp_path: Path, store: Stores) -> None:
    async def scenario(s: Services, script: Script, store: ResponseRows) -> None:
        await Client({"input": "one"}).call(s, store)
        await Client({"input": "two", "previous_response_id": "resp_1"}).call(s, store)
        app = Starlette(routes=responses_routes(s), exception_handlers=dict(HANDLERS))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            got = await http.get("/v1/responses/resp_2")
            assert got.status_code == 200 and got.json()["previous_response_id"] == "resp_1"
            items = (await http.get("/v1/responses/resp_2/input_items")).json()
            assert items["object"] == "list" and items["has_more"] is False
            texts = [i["content"][0]["text"] for i in items["data"]]
            assert texts == ["two", "answer 1", "one"]  # newest first, as OpenAI lists
            assert all(i["id"] for i in items["data"])
            asc = await http.get("/v1/responses/resp_2/input_items?order=asc&limit=1")
            assert asc.json()["has_more"] is True
            assert asc.json()["data"][0]["content"][0]["text"] == "one"
            after = asc.json()["last_id"]
            rest = await http.get(f"/v1/responses/resp_2/input_items?order=asc&after={after}")
            assert [i["content"][0]["text"] for i in rest.json()["data"]] == ["answer 1", "two"]
            gone = await http.delete("/v1/responses/resp_1")
            assert gone.json() == {"id": "resp_1", "object": "response", "deleted": True}
            for url in ("/v1/responses/resp_1", "/v1/responses/resp_1/input_items"):
                assert (await http.get(url)).status_code == 404
            assert (await http.delete("/v1/responses/resp_1")).status_code == 404
            items = (await http.get("/v1/responses/resp_2/input_items?order=asc")).json()
            assert [i["content"][0]["text"] for i in items["data"]] == ["one", "answer 1", "two"]

    _run(tmp_path, store, scenario)


def test_a_version_4_store_migrates(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for n, step in enumerate(MIGRATIONS[:4]):
        conn.executescript(f"BEGIN;\n{step}\nPRAGMA user_version = {n + 1};\nCOMMIT;")
    conn.close()

    async def main() -> None:
        async with SqliteStore(path) as s:
            store = s.responses
            await store.save("", {"id": "resp_x", "output": []}, None, "m", [])
            assert (await store.get("", "resp_x")) is not None

    asyncio.run(main())
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    conn.close()


def test_a_stored_chain_is_a_session_whose_kv_a_switch_keeps(tmp_path: Path) -> None:
    """Each stored turn keeps the chain's conversation as the session of its first
    response and labels the slot with it (what a switch saves and restores); a turn that
    continues the chain names that session to admission; a chain's session is whole
    when replayed, counts against no key's session bound, and goes with a DELETE."""

    async def scenario(s: Services, script: Script, store: ResponseRows) -> None:
        session = chain_session("resp_1")
        await Client({"input": "My name is Zorg.", "instructions": "Be kind."}).call(s, store)
        kept = await s.store.get("", session)
        assert kept is not None and [m.message["role"] for m in kept.messages] == [
            "system", "user", "assistant"]  # fmt: skip
        covered = s.sessions.slots.get("m")
        assert covered is not None and (covered.owner, covered.session_id) == ("", session)
        assert list(covered.messages) == [m.message for m in kept.messages]
        named: list[SessionRef | None] = []
        body = {"input": "My name?", "previous_response_id": "resp_1", "stream": True}
        door = Responses(s, "/v1/responses", store)
        original = door.admission.admitted

        def spy(*args: Any, **kw: Any) -> Any:
            named.append(kw.get("session"))
            return original(*args, **kw)

        door.admission.admitted = spy  # type: ignore[method-assign]
        client = Client(body)
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/responses",
            "headers": [(b"content-type", b"application/json")],
            "state": {"owner": ""},
        }
        await door(scope, client.receive, client.send)
        assert named == [SessionRef(session, None, "")]  # a switch it causes is for it
        kept = await s.store.get("", session)
        # rewritten whole: both turns (instructions are each request's own, as OpenAI's)
        assert kept is not None and len(kept.messages) == 4
        covered = s.sessions.slots.get("m")
        assert covered is not None and covered.n_messages == 4
        found = await s.sessions.replay_prompt("m", SessionRef(session, None, ""))
        assert found is not None and found[1].messages() == list(covered.messages)
        assert await s.store.owned("") == 0  # not a chat session: no key's bound counts it

        app = Starlette(routes=responses_routes(s), exception_handlers=dict(HANDLERS))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.delete("/v1/responses/resp_2")).status_code == 200
        assert await s.store.get("", session) is None  # it held the deleted text
        assert s.sessions.slots.get("m") is None  # no slot is saved under its name
        image = [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
        await Client({"input": image}).call(s, store)
        assert await s.store.get("", chain_session("resp_3")) is None  # not text: no session

    _run(tmp_path, None, scenario)


def test_another_key_cannot_read_list_or_delete_a_stored_response(tmp_path: Path) -> None:
    """GET, input_items and DELETE look only among the asking key's responses: another
    key's is a 404, as an id never stored, and stays for its owner (its chain's session
    too)."""

    async def scenario(s: Services, script: Script, store: ResponseRows) -> None:
        await Client({"input": "secret"}, owner="alice").call(s, store)
        routes = Starlette(routes=responses_routes(s), exception_handlers=dict(HANDLERS))
        as_owner: dict[str, str] = {}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("state", {})[OWNER] = as_owner["owner"]
            await routes(scope, receive, send)

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for owner in ("bob", ""):
                as_owner["owner"] = owner
                assert (await http.get("/v1/responses/resp_1")).status_code == 404
                assert (await http.get("/v1/responses/resp_1/input_items")).status_code == 404
                gone = await http.delete("/v1/responses/resp_1")
                assert gone.status_code == 404 and gone.json()["error"]["param"] == "response_id"
            as_owner["owner"] = "alice"
            assert (await http.get("/v1/responses/resp_1")).status_code == 200
        assert await s.store.get("alice", chain_session("resp_1")) is not None

    _run(tmp_path, None, scenario)
