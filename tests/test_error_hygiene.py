"""What a client reads of an error, and what only the server log gets.

A client is told what failed, in words ("llama-server could not be reached",
"the session store could not be read or written"), with the request's id; the
library's exception text, addresses and paths go to the server log, once, with
that id. A stream's error comes before its ``data: [DONE]``. The last test runs
against the real llama-server, with a real SQLite lock held on the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotmodel import sse
from hotmodel.api.errors import hotmodel_error_response, upstream_error_response
from hotmodel.api.relay import ErrorBeforeDone
from hotmodel.errors import (
    ModelLoadError,
    RouterUnavailableError,
    SessionNotFoundError,
    StoreError,
)
from hotmodel.router.chat_http import ChatHttp
from hotmodel.router.client import RouterClient
from hotmodel.router.supervisor import free_port
from hotmodel.sessions.sqlite import SqliteStore
from tests.conftest import HotmodelProcess, chat, start_hotmodel, write_config


def _body(response: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.body)["error"]
    return data


def test_an_error_keeps_its_detail_for_the_log_only(caplog: pytest.LogCaptureFixture) -> None:
    exc = RouterUnavailableError("llama-server could not be reached", detail="host 10.0.0.9:81")
    assert exc.public == "llama-server could not be reached"
    assert str(exc) == "llama-server could not be reached (host 10.0.0.9:81)"  # for the log
    with caplog.at_level(logging.WARNING, "hotmodel.api"):
        response = hotmodel_error_response(exc, "abc123")
    error = _body(response)
    assert response.status_code == 503 and response.headers["retry-after"]
    assert error["message"] == (
        "llama-server could not be reached (request id abc123; the server log has the details)"
    )
    (logged,) = caplog.records
    assert "10.0.0.9:81" in logged.getMessage() and "abc123" in logged.getMessage()
    # a model's load failure: its summary; the router log's tail (file names) is the log's
    assert ModelLoadError("model 'm' failed to load", "/srv/models/m.gguf: bad").public == (
        "model 'm' failed to load"
    )


def test_an_error_with_nothing_hidden_is_sent_whole_and_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, "hotmodel.api"):
        response = hotmodel_error_response(SessionNotFoundError("no session 's'"), "abc123")
    assert _body(response)["message"] == "no session 's'" and response.status_code == 404
    assert caplog.records == []


def test_an_unreachable_llama_server_is_said_in_words_and_its_address_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both clients: aiohttp (chat) against a port nobody listens on, httpx (control)."""
    port = free_port("127.0.0.1")

    async def chat() -> None:
        async with ChatHttp(5) as chat_http:
            http = httpx.AsyncClient()
            client = RouterClient(http, f"http://127.0.0.1:{port}", chat_http=chat_http)
            try:
                async with client.chat(b"{}"):
                    pass
            finally:
                await http.aclose()

    async def control() -> None:
        async with httpx.AsyncClient() as http:
            await RouterClient(http, f"http://127.0.0.1:{port}").models()

    for scenario in (chat, control):  # the same words, whichever library (router/boundary.py)
        caplog.clear()
        with pytest.raises(RouterUnavailableError) as info:
            asyncio.run(scenario())
        with caplog.at_level(logging.WARNING, "hotmodel.api"):
            message = _body(hotmodel_error_response(info.value, "rid7"))["message"]
        assert "llama-server could not be reached" in message
        assert str(port) not in message and "127.0.0.1" not in message
        assert "request id rid7" in message
        (logged,) = caplog.records
        assert f"127.0.0.1:{port}" in logged.getMessage() and "rid7" in logged.getMessage()


def test_a_store_that_cannot_be_written_does_not_name_its_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite refuses the write for real (``query_only``; a read-only folder would
    not stop root, who runs these tests)."""
    path = tmp_path / "private" / "s.sqlite3"

    async def scenario() -> None:
        async with SqliteStore(path) as store:
            await store._call(lambda: store._db().execute("PRAGMA query_only = ON"))
            await store.delete("", "s")

    with pytest.raises(StoreError) as info:
        asyncio.run(scenario())
    with caplog.at_level(logging.WARNING, "hotmodel.api"):
        response = hotmodel_error_response(info.value, "rid8")
    message = _body(response)["message"]
    assert response.status_code == 500 and "private" not in message and "sqlite" not in message
    assert message.startswith("the session store could not be read or written")
    assert str(path) in caplog.records[0].getMessage()
    assert "readonly" in caplog.records[0].getMessage()


def test_the_routers_proxy_error_for_a_dead_model_process_is_a_503() -> None:
    """The router's answer when the model's process died and it has not seen the exit
    (plain text, 500) or has (400): not an ``upstream_error`` 500, not the client's 400."""
    for status, body in (
        (500, b"proxy error: Could not establish connection"),
        (400, b'{"error": {"code": 400, "message": "model is not loaded"}}'),
        (400, b'{"error": {"code": 400, "message": "model name=m is not running"}}'),
    ):
        response = upstream_error_response(status, body, "rid9")
        assert response.status_code == 503 and response.headers["retry-after"], body
        assert _body(response)["code"] == "model_unavailable"
    other = upstream_error_response(500, b'{"error": {"code": 500, "message": "boom"}}')
    assert other.status_code == 500 and _body(other)["code"] == "upstream_error"


STREAM_END = (
    b'data: {"choices":[{"delta":{"content":"data: [DONE]"}}]}\n\n'  # the text, not the line
    b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


def test_an_error_goes_before_done_however_the_stream_is_cut() -> None:
    event = sse.encode({"error": {"message": "not stored"}})
    at = STREAM_END.rindex(b"data: [DONE]")
    expected = STREAM_END[:at] + event + STREAM_END[at:]
    for size in range(1, len(STREAM_END) + 1):
        cut = [STREAM_END[i : i + size] for i in range(0, len(STREAM_END), size)]
        # the write fails with the chunk that completes the answer's last event (or, here,
        # any before it): never with the [DONE] line's own
        for first in range((at - 1) // size + 1):
            gate = ErrorBeforeDone(event)
            out = b"".join(cut[:first]) + b"".join(gate.feed(c) for c in cut[first:])
            assert out + gate.end() == expected, (size, first)
    cut_short = ErrorBeforeDone(event)  # a stream that ends without [DONE]: at its end
    assert cut_short.feed(b"data: {}\n\n") + cut_short.end() == b"data: {}\n\n" + event


@pytest.mark.slow
def test_a_real_streamed_turn_whose_store_write_fails_ends_with_the_error_before_done(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path
) -> None:
    """Another process holds the store's write lock (a real SQLite lock: hotmodel's write
    waits its 5 s, then fails). The session's streamed turn is delivered, then the
    error event, then ``[DONE]``; the store's path is in the server log only."""
    hp = start_hotmodel(write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny"))
    try:
        headers = {"x-session-id": "locked"}
        assert chat(hp, headers=headers).status_code == 200  # the session exists
        lock = sqlite3.connect(tmp_path / "state" / "sessions.sqlite3", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # readers go on (WAL); writers wait, then fail
        try:
            resp = chat(hp, headers=headers, stream=True)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        _check_store_error_before_done(resp, hp, str(tmp_path))
    finally:
        assert hp.stop() == 0, hp.output()


def _check_store_error_before_done(resp: httpx.Response, hp: HotmodelProcess, path: str) -> None:
    assert resp.status_code == 200, resp.text
    events = sse.SseParser().feed(resp.content)
    assert events[-1].data == "[DONE]", resp.text
    error = events[-2].json()["error"]
    assert error["code"] == "store_error", resp.text
    assert error["message"].startswith("the answer was not stored in the session: the session")
    assert path not in resp.text and "sqlite" not in resp.text
    request_id = resp.headers["x-request-id"]
    assert f"request id {request_id}" in error["message"]
    logged = [line for line in hp.output().splitlines() if request_id in line]
    assert any(path in line and "database is locked" in line for line in logged), logged
