"""Anthropic Messages (api/anthropic.py, api/messages.py), fast.

The pure parts directly; the handler as a plain ASGI app, behind the real error
handlers, the Anthropic error middleware and the key check, against a scripted
llama-server on a real socket (as tests/test_endpoints.py drives the other endpoints).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from starlette.middleware.exceptions import ExceptionMiddleware

from hotmodel.api import anthropic
from hotmodel.api.app import HANDLERS
from hotmodel.api.auth import RequireKeys
from hotmodel.api.inference import Inference
from hotmodel.api.messages import (
    COUNT_TOKENS,
    AnthropicErrors,
    Messages,
    check_messages_request,
)
from hotmodel.api.record import RECORD, RequestRecord, Usage
from hotmodel.errors import InvalidRequestError
from hotmodel.runtime import Services
from hotmodel.security import KeySet
from tests import fakes
from tests.fakes import door_config

USER = {"role": "user", "content": "hi"}


# --- pure ---


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]"),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
        ({"messages": [USER], "max_tokens": True}, "max_tokens"),
        ({"messages": [USER], "stream": "yes"}, "stream"),
        ({"messages": [USER], "system": 3}, "system"),
        ({"messages": [USER], "tools": [{"description": "x"}]}, "tools[0]"),
        ({"messages": [USER], "stop_sequences": [1]}, "stop_sequences"),
        ({"messages": [{"role": "user", "content": "x" * 200_000}]}, "messages"),
    ],
)
def test_each_check_names_the_field(tmp_path: Path, payload: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_messages_request(payload, door_config(tmp_path))
    assert refused.value.param == param


def test_a_system_message_in_the_conversation_passes(tmp_path: Path) -> None:
    """Claude Code 2.1.332 sends its environment notes as a `system` message after the
    first user turn (llama-server reads it as a chat system message); in a session it
    is pinned like the request's `system`, not stored."""
    notes = {"role": "system", "content": [{"type": "text", "text": "# Environment"}]}
    payload = {"max_tokens": 8, "messages": [USER, notes]}
    check_messages_request(payload, door_config(tmp_path))
    assert anthropic.to_chat(payload)[1] == {"role": "system", "content": "# Environment"}


def test_a_session_turn_converts_to_chat_and_back() -> None:
    payload = {
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
        ],
    }
    chat = anthropic.to_chat(payload)
    assert chat == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    system, messages = anthropic.from_chat([{"role": "system", "content": "S"}, *chat])
    assert system == "S\n\nBe brief."
    assert messages == [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    image = {"type": "image", "source": {}}
    with pytest.raises(InvalidRequestError) as refused:
        anthropic.to_chat({"messages": [{"role": "user", "content": [image]}]})
    assert refused.value.param == "messages[0].content[0]"
    with pytest.raises(InvalidRequestError) as refused:
        anthropic.to_chat({"messages": [USER], "tools": [{"name": "f"}]})
    assert refused.value.param == "tools"


def _events(*events: tuple[str, dict[str, Any]]) -> list[bytes]:
    # compact, as llama-server writes it (the record's token counts are read so)
    tight = (",", ":")
    return [f"event: {e}\ndata: {json.dumps(d, separators=tight)}\n\n".encode() for e, d in events]


STREAM = _events(
    ("message_start", {"type": "message_start", "message": {"content": [], "usage": {
        "cache_read_input_tokens": 5, "input_tokens": 2, "output_tokens": 0}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hel"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "lo"}}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                       "usage": {"output_tokens": 2}}),
    ("message_stop", {"type": "message_stop"}),
)  # fmt: skip


def test_the_answer_text_plain_and_streamed() -> None:
    plain = {
        "content": [
            {"type": "text", "text": "Hi"},
            {"type": "tool_use"},
            {"type": "text", "text": "!"},
        ]
    }
    assert anthropic.reply_of(json.dumps(plain).encode()) == {"role": "assistant", "content": "Hi!"}
    assert anthropic.reply_of(b"nope") is None
    whole = anthropic.StreamAssembler()
    joined = b"".join(STREAM)
    for i in range(0, len(joined), 7):  # events cut across reads
        assert whole.message() is None
        whole.feed(joined[i : i + 7])
    assert whole.message() == {"role": "assistant", "content": "Hello"}
    cut = anthropic.StreamAssembler()
    for chunk in STREAM[:-1]:
        cut.feed(chunk)
    assert cut.message() is None  # no message_stop: nothing to store


def test_errors_in_anthropics_shape() -> None:
    for status, kind in [(400, "invalid_request_error"), (401, "authentication_error"),
                         (403, "permission_error"), (404, "not_found_error"),
                         (413, "request_too_large"), (429, "rate_limit_error"),
                         (500, "api_error"), (503, "overloaded_error"),
                         (529, "overloaded_error"), (409, "invalid_request_error"),
                         (504, "api_error")]:  # fmt: skip
        assert anthropic.error_type(status) == kind
    openai = b'{"error":{"message":"no such model","type":"invalid_request_error","code":"x"}}'
    assert json.loads(anthropic.reshape_error(404, openai)) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "no such model"},
    }
    error = {"message": "cancelled", "type": "server_error", "code": "switch_cancelled"}
    event = b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
    out = anthropic.reshape_events(b"event: x\ndata: {}\n\n" + event)
    assert out.startswith(b"event: x\ndata: {}\n\nevent: error\ndata: ")
    data = json.loads(out.split(b"event: error\ndata: ")[1])
    assert data == {"type": "error", "error": {"type": "overloaded_error", "message": "cancelled"}}


# --- the handler, against a scripted llama-server ---


class Script(fakes.Script):
    """Anthropic's answers: a message, or (``stream``) its events; a token count."""

    def __init__(self) -> None:
        super().__init__()
        self.stream = False

    async def respond(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if request.path.endswith("/count_tokens"):
            return web.json_response({"input_tokens": 3})
        if not self.stream:
            answer = {"type": "message", "content": [{"type": "text", "text": f"A{len(self.got)}"}]}
            return web.json_response(answer)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in STREAM:
            await resp.write(chunk)
        return resp


async def call(
    app: Any,
    path: str,
    body: bytes | dict[str, Any],
    headers: dict[str, str] | None = None,
    record: RequestRecord | None = None,
) -> tuple[int, dict[str, str], bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent: list[MutableMapping[str, Any]] = []
    done = False

    async def receive() -> dict[str, Any]:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "state": {} if record is None else {RECORD: record},
    }
    await app(scope, receive, send)
    head = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return int(sent[0]["status"]), head, b"".join(m.get("body", b"") for m in sent[1:])


def _door(s: Services, keys: KeySet | None = None) -> Callable[..., Any]:
    """/v1/messages and count_tokens behind the handlers, the keys and the error shape."""
    messages, count = Messages(s), Inference(s, COUNT_TOKENS)

    async def route(scope: Any, receive: Any, send: Any) -> None:
        app = count if scope["path"].endswith("/count_tokens") else messages
        await app(scope, receive, send)

    key_set = keys or KeySet()
    answered = ExceptionMiddleware(route, handlers=dict(HANDLERS))
    return AnthropicErrors(RequireKeys(answered, keys=lambda: key_set))


def test_a_request_goes_to_llama_servers_messages_with_the_model_named(tmp_path: Path) -> None:
    async def scenario(s: Services, script: Script) -> None:
        door = _door(s)
        tool = {"name": "f", "input_schema": {"type": "object"}}
        status, _, body = await call(door, "/v1/messages", {"messages": [USER], "tools": [tool]})
        assert status == 200 and json.loads(body)["content"][0]["text"] == "A1"
        ((path, sent),) = script.got
        assert path == "/v1/messages" and sent["model"] == "m" and "max_tokens" in sent
        assert sent["tools"] == [tool]
        status, _, body = await call(door, "/v1/messages/count_tokens", {"messages": [USER]})
        assert status == 200 and json.loads(body) == {"input_tokens": 3}
        assert script.got[-1][0] == "/v1/messages/count_tokens"

    fakes.run_scripted(Script(), scenario, door_config(tmp_path))


def test_refusals_are_in_anthropics_shape_and_send_nothing(tmp_path: Path) -> None:
    async def scenario(s: Services, script: Script) -> None:
        door = _door(s)
        cases: list[tuple[bytes | dict[str, Any], int, str]] = [
            (b"{not json", 400, "invalid_request_error"),
            ({"messages": [USER], "model": "nope"}, 404, "not_found_error"),
            ({"messages": "x"}, 400, "invalid_request_error"),
        ]
        for body, status, kind in cases:
            got, head, raw = await call(door, "/v1/messages", body)
            answer = json.loads(raw)
            assert (got, answer["type"], answer["error"]["type"]) == (status, "error", kind)
            assert head["content-length"] == str(len(raw))
        session = {"x-session-id": "s1"}
        image = {"role": "user", "content": [{"type": "image", "source": {}}]}
        got, _, raw = await call(door, "/v1/messages", {"messages": [image]}, session)
        assert got == 400 and "session holds text" in json.loads(raw)["error"]["message"]
        assert script.got == []
        assert await s.store.get("", "s1", 10) is None  # no session was made

    fakes.run_scripted(Script(), scenario, door_config(tmp_path))


def test_keys_come_as_x_api_key_or_bearer_and_a_refusal_is_anthropics(tmp_path: Path) -> None:
    async def scenario(s: Services, script: Script) -> None:
        door = _door(s, KeySet(client=("client-key-aaaaaaaa",)))
        for headers in ({}, {"x-api-key": "wrong"}):
            got, _, raw = await call(door, "/v1/messages", {"messages": [USER]}, headers)
            assert got == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
        for headers in ({"x-api-key": "client-key-aaaaaaaa"},
                        {"authorization": "Bearer client-key-aaaaaaaa"}):  # fmt: skip
            got, _, _ = await call(door, "/v1/messages/count_tokens", {"messages": [USER]}, headers)
            assert got == 200

    fakes.run_scripted(Script(), scenario, door_config(tmp_path))


def test_a_session_is_stored_and_the_next_turn_sees_it(tmp_path: Path) -> None:
    async def scenario(s: Services, script: Script) -> None:
        door = _door(s)
        session = {"x-session-id": "trip"}
        first = {"system": "Be brief.", "messages": [{"role": "user", "content": "Lisbon"}]}
        got, head, _ = await call(door, "/v1/messages", first, session)
        assert got == 200 and head["x-session-id"] == "trip"
        script.stream = True
        second = {
            "stream": True,
            "system": "Be kind.",
            "messages": [{"role": "user", "content": "Where?"}],
        }
        got, head, raw = await call(door, "/v1/messages", second, session)
        assert got == 200 and head["content-type"].startswith("text/event-stream")
        assert b"message_stop" in raw
        sent = script.got[-1][1]
        assert sent["system"] == "Be kind."  # a request's own, as on chat: not stored
        assert sent["messages"] == [
            {"role": "user", "content": "Lisbon"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Where?"},
        ]
        stored = await s.store.get("", "trip", 100)
        assert stored is not None
        assert [(m.message["role"], m.message["content"]) for m in stored.messages] == [
            ("user", "Lisbon"),
            ("assistant", "A1"),
            ("user", "Where?"),
            ("assistant", "Hello"),
        ]

    fakes.run_scripted(Script(), scenario, door_config(tmp_path))


def test_token_counts_of_plain_and_streamed_answers_reach_the_record(tmp_path: Path) -> None:
    """The metrics' counts: a plain answer's ``usage``; a stream's prompt counts from its
    first event (``message_start``), its length from ``message_delta``."""

    async def scenario(s: Services, script: Script) -> None:
        door = _door(s)
        plain = RequestRecord.detached()
        got, _, _ = await call(door, "/v1/messages", {"messages": [USER]}, record=plain)
        assert got == 200 and plain.usage is None  # the scripted answer says no usage
        script.stream = True
        streamed = RequestRecord.detached()
        body = {"messages": [USER], "stream": True}
        got, _, raw = await call(door, "/v1/messages", body, record=streamed)
        assert got == 200 and b"message_stop" in raw
        assert streamed.usage == Usage(7, 2, 5)
        assert streamed.first_token is not None

    fakes.run_scripted(Script(), scenario, door_config(tmp_path))
