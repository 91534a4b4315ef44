"""Bad input stops at the door: the pure checks of a chat request (no server)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from hotmodel.api.chat import parse_body
from hotmodel.api.validate import (
    MAX_DEPTH,
    check_fields,
    check_messages,
    check_tree,
    parse_json,
    read_asgi_body,
    tree_needs_check,
)
from hotmodel.errors import InvalidRequestError, PayloadTooLargeError, RequestTimeoutError

U = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": -Infinity}', "Infinity is not valid JSON"),
        (b'{"a": 1e400}', "too large for a number"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    ],
)
def test_bodies_that_are_not_json(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_json(body)


def test_depth_and_surrogates_are_checked_without_recursion() -> None:
    deep: Any = "x"
    for _ in range(MAX_DEPTH):
        deep = [deep]
    check_tree({"a": deep[0]})  # exactly at the limit
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        check_tree({"a": deep})
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        check_tree({"messages": [{"role": "user", "content": "\ud800"}]})
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        check_tree({"\udfff": 1})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a":' + b"[" * MAX_DEPTH + b"1" + b"]" * MAX_DEPTH + b"}", "nested too deeply"),
        (b'{"messages":[{"role":"user","content":"\\ud800"}]}', "lone surrogate"),
        (b'{"messages":[{"role":"user","content":"x\\uDFFFy"}]}', "lone surrogate"),
        (b'{"\\udc00":1}', "lone surrogate"),
        (b'{"messages":[{"role":"user","content":"\xed\xa0\x80"}]}', "lone surrogate"),
        ('{"a":"\ud800"}'.encode("utf-16-le", "surrogatepass"), "lone surrogate"),
    ],
)
def test_the_door_never_skips_the_tree_check_when_it_could_fail(body: bytes, message: str) -> None:
    """parse_body walks the tree only when the raw bytes say it could fail: these must."""
    assert tree_needs_check(body)
    with pytest.raises(InvalidRequestError, match=message):
        parse_body(body)


def test_plain_bodies_skip_the_walk_and_surrogate_pairs_pass() -> None:
    assert not tree_needs_check(b'{"messages":[{"role":"user","content":"hi \xc3\xa9"}]}')
    pair = b'{"messages":[{"role":"user","content":"\\ud83d\\ude00"}]}'
    assert tree_needs_check(pair)  # an escaped pair is looked at, and is fine
    assert parse_body(pair)["messages"][0]["content"] == "\U0001f600"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hi", "messages"),
        ([U] * 11, "messages"),
        (["hi"], "messages[0]"),
        ([{"role": 5, "content": "x"}], "messages[0].role"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"text": "x"}]}], "messages[0].content[0]"),
        (
            [{"role": "user", "content": [{"type": "text", "text": None}]}],
            "messages[0].content[0].text",
        ),
        ([U, {"role": "assistant", "content": None}], "messages[1].content"),
        ([U, {"role": "assistant", "content": "", "tool_calls": {}}], "messages[1].tool_calls"),
        (
            [U, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 1}}]}],
            "messages[1].tool_calls[0]",
        ),
        ([{"role": "tool", "content": "x", "tool_call_id": 3}], "messages[0].tool_call_id"),
        ([{"role": "user", "content": "x", "name": []}], "messages[0].name"),
    ],
)
def test_malformed_messages_name_the_field(messages: Any, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_messages(messages, max_messages=10)
    assert info.value.param == param


def test_well_formed_messages_pass() -> None:
    check_messages(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
        max_messages=10,
    )


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 5]}, "stop"),
        ({"tools": "x"}, "tools"),
        ({"tools": [5]}, "tools[0]"),
        ({"response_format": "json"}, "response_format"),
    ],
)
def test_parameter_types(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_fields(payload)
    assert info.value.param == param


def test_null_parameters_mean_the_default_and_extras_pass() -> None:
    check_fields({"temperature": None, "stream": None, "max_tokens": 5, "ignore_eos": True})
    check_fields({"temperature": 1, "top_p": 0.5, "stop": ["x"], "n_probs": "anything"})


def _messages(*messages: dict[str, Any]) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


def test_asgi_body_in_chunks_and_its_limits() -> None:
    """Chunked (no Content-Length) bodies are joined; 413 as soon as the declared or the
    received size passes the limit; a client that leaves mid-body is ClientDisconnect."""
    chunks = _messages(
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    )
    assert asyncio.run(read_asgi_body(chunks, "", 10)) == b"abcd"
    with pytest.raises(PayloadTooLargeError, match="11 or more"):
        asyncio.run(read_asgi_body(_messages(), "11", 10))  # refused before any read
    big = _messages(
        {"type": "http.request", "body": b"x" * 8, "more_body": True},
        {"type": "http.request", "body": b"x" * 8, "more_body": True},
    )
    with pytest.raises(PayloadTooLargeError, match="16 or more"):
        asyncio.run(read_asgi_body(big, "", 10))
    gone = _messages(
        {"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}
    )
    with pytest.raises(ClientDisconnect):
        asyncio.run(read_asgi_body(gone, "", 10))


def test_a_body_that_stops_coming_gets_a_408() -> None:
    """Half a body, then nothing (the connection open): refused at the deadline, not held."""
    sent = [{"type": "http.request", "body": b'{"messages": ', "more_body": True}]

    async def receive() -> dict[str, Any]:
        if sent:
            return sent.pop(0)
        await asyncio.Event().wait()  # the client sends nothing more
        raise AssertionError("unreachable")

    with pytest.raises(RequestTimeoutError, match=re.escape("within 0.05s (13 bytes came)")):
        asyncio.run(read_asgi_body(receive, "500", 1000, timeout=0.05))


def test_a_408_closes_the_connection() -> None:
    """The body never arrived whole: what is left on the connection cannot be framed."""
    from hotmodel.api.errors import hotmodel_error_response

    resp = hotmodel_error_response(RequestTimeoutError("the request body did not arrive"))
    assert resp.status_code == 408 and resp.headers["connection"] == "close"
