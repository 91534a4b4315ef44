"""The chat endpoint's ownership of what a request acquires, driven as a plain ASGI app.

The router is a scripted HTTP server on a real socket behind the real
``RouterClient`` (its answers can hang or stream forever on cue); the gate, the session locks, the
store and the control loop are the real ones. Each test ends a request in a
different way and checks that the ticket and the session lock are returned
and the upstream answer closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from hotmodel.api.chat import ChatCompletions
from hotmodel.cluster.postgres import LocalPostgres
from hotmodel.config import load_config
from hotmodel.control.commands import Recover
from hotmodel.errors import HttpError, StoreUnavailableError, http_error_for
from hotmodel.router.models import ModelState, ModelStatus
from hotmodel.runtime import Services
from hotmodel.sessions.postgres import PostgresStore
from hotmodel.sessions.sqlite import SqliteStore
from tests.conftest import write_config
from tests.fakes import fake_services


class Upstream:
    """A scripted llama-server answer: first chunk at once, then it hangs until ``finish``.

    ``closed`` is set when the handler ends, however: the answer was completed,
    or the client closed the connection (which is how llama-server learns to stop).
    """

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.finish = asyncio.Event()
        self.closed = asyncio.Event()
        self.hang_before_answer = False

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.requested.set()
        try:
            if self.hang_before_answer:
                await asyncio.Event().wait()
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n')
            await self.finish.wait()
            await resp.write(
                b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
            )
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.closed.set()

    async def was_closed(self) -> bool:
        """The answer ended (awaited: the server sees a client's close a moment later)."""
        await asyncio.wait_for(self.closed.wait(), 5)
        return True


@contextlib.asynccontextmanager
async def services(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Services]:
    async with fake_services(
        load_config(write_config(tmp_path, {"m": tmp_path / "m.gguf"}, "m")),
        tmp_path,
        upstream.handler,
    ) as services:
        yield services


class Client:
    """The client side of one ASGI request: its body, what it was sent, and when it leaves."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = json.dumps(body).encode()
        self.sent: list[MutableMapping[str, Any]] = []
        self.started = asyncio.Event()
        self.chunk = asyncio.Event()
        self.leave = asyncio.Event()
        self._body_read = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_read:
            self._body_read = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.start":
            self.started.set()
        elif message.get("body"):
            self.chunk.set()

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": [(b"content-type", b"application/json"), (b"x-session-id", b"s1")],
            "query_string": b"",
        }

    def text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.sent).decode()


STREAM = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


def _run(tmp_path: Path, scenario: Callable[[Services, Upstream], Any]) -> Any:
    async def main() -> Any:
        upstream = Upstream()
        async with services(tmp_path, upstream) as s:
            result = await scenario(s, upstream)
            assert s.gate.inflight() == [], "a ticket was left behind"
            assert len(s.sessions.locks) == 0, "a session lock was left held"
            return result

    return asyncio.run(main())


def test_a_complete_stream_is_relayed_and_stored(tmp_path: Path) -> None:
    async def scenario(s: Services, upstream: Upstream) -> None:
        client = Client(STREAM)
        upstream.finish.set()
        await ChatCompletions(s)(client.scope(), client.receive, client.send)
        assert "[DONE]" in client.text() and await upstream.was_closed()
        stored = await s.store.get("", "s1")
        assert stored is not None
        assert [m.message["content"] for m in stored.messages] == ["hi", "Hi"]

    _run(tmp_path, scenario)


def test_client_leaving_mid_stream_releases_everything(tmp_path: Path) -> None:
    async def scenario(s: Services, upstream: Upstream) -> None:
        client = Client(STREAM)
        task = asyncio.create_task(ChatCompletions(s)(client.scope(), client.receive, client.send))
        await client.chunk.wait()
        assert len(s.gate.inflight()) == 1
        client.leave.set()
        await asyncio.wait_for(task, 5)
        assert await upstream.was_closed()  # llama-server is told to stop generating
        assert await s.store.get("", "s1") is None  # a cut answer stores nothing

    _run(tmp_path, scenario)


def test_cancelled_between_the_handler_and_the_relay(tmp_path: Path) -> None:
    """Cancelled right as the answer starts (e.g. a server shutdown): nothing stays held."""

    async def scenario(s: Services, upstream: Upstream) -> None:
        client = Client(STREAM)
        task = asyncio.create_task(ChatCompletions(s)(client.scope(), client.receive, client.send))
        await client.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await upstream.was_closed()

    _run(tmp_path, scenario)


def test_cancelled_while_waiting_for_the_router(tmp_path: Path) -> None:
    async def scenario(s: Services, upstream: Upstream) -> None:
        upstream.hang_before_answer = True
        client = Client(STREAM)
        task = asyncio.create_task(ChatCompletions(s)(client.scope(), client.receive, client.send))
        await upstream.requested.wait()
        assert len(s.gate.inflight()) == 1 and len(s.sessions.locks) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    _run(tmp_path, scenario)


def test_a_switch_cancelling_the_stream_ends_it_with_an_error_event(tmp_path: Path) -> None:
    async def scenario(s: Services, upstream: Upstream) -> None:
        client = Client(STREAM)
        task = asyncio.create_task(ChatCompletions(s)(client.scope(), client.receive, client.send))
        await client.chunk.wait()
        assert s.gate.cancel({"m"}, "cancelled: switching 'm' -> 'x'") == 1
        await asyncio.wait_for(task, 5)
        text = client.text()
        assert '"code": "switch_cancelled"' in text and "switching 'm' -> 'x'" in text
        assert client.sent[-1]["more_body"] is False  # the stream was ended properly
        assert await upstream.was_closed()

    _run(tmp_path, scenario)


def test_an_unknown_model_returns_its_ticket(tmp_path: Path) -> None:
    """The bug this design removed: a 404 used to leave its ticket behind forever."""

    async def scenario(s: Services, upstream: Upstream) -> None:
        client = Client({**STREAM, "model": "nope"})
        with pytest.raises(Exception, match="'nope' is not a preset"):
            await ChatCompletions(s)(client.scope(), client.receive, client.send)
        assert not upstream.requested.is_set()

    _run(tmp_path, scenario)


def test_a_plain_request_whose_client_leaves_stops_and_stores_nothing(tmp_path: Path) -> None:
    async def scenario(s: Services, upstream: Upstream) -> None:
        client = Client({"messages": [{"role": "user", "content": "hi"}]})
        task = asyncio.create_task(ChatCompletions(s)(client.scope(), client.receive, client.send))
        await upstream.requested.wait()
        client.leave.set()  # gone before the answer is complete
        await asyncio.wait_for(task, 5)
        assert client.sent == []  # nobody to send to
        assert await upstream.was_closed()  # llama-server is told to stop
        assert await s.store.get("", "s1") is None

    _run(tmp_path, scenario)


def test_a_client_leaving_before_the_answer_starts_stops_llama_server(tmp_path: Path) -> None:
    """A plain answer starts only when the generation is done: leaving must not wait for it."""

    async def scenario(s: Services, upstream: Upstream) -> None:
        upstream.hang_before_answer = True  # generating; no status line yet
        client = Client({"messages": [{"role": "user", "content": "hi"}]})
        task = asyncio.create_task(ChatCompletions(s)(client.scope(), client.receive, client.send))
        await upstream.requested.wait()
        client.leave.set()
        await asyncio.wait_for(task, 5)
        assert client.sent == []
        assert await upstream.was_closed()  # the connection was closed: llama-server stops
        assert await s.store.get("", "s1") is None

    _run(tmp_path, scenario)


def test_a_stream_whose_answer_cannot_be_stored_says_so_before_its_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store refuses the write for real (SQLite's ``query_only``: it holds as root,
    where a read-only folder would not). The error event comes before ``data: [DONE]``
    (a client stops reading there); it says what failed, not where the store is."""

    async def scenario(s: Services, upstream: Upstream) -> None:
        client = Client(STREAM)
        task = asyncio.create_task(ChatCompletions(s)(client.scope(), client.receive, client.send))
        await upstream.requested.wait()  # the session was read: now its writes fail
        store = s.store
        assert isinstance(store, SqliteStore)
        await store._call(lambda: store._db().execute("PRAGMA query_only = ON"))
        upstream.finish.set()
        await asyncio.wait_for(task, 5)
        text = client.text()
        error_at, done_at = text.find('"code": "store_error"'), text.find("data: [DONE]")
        assert 0 <= error_at < done_at, text
        assert text.endswith("data: [DONE]\n\n"), text  # nothing after it
        assert "the session store could not be read or written" in text
        assert str(tmp_path) not in text and "sqlite3" not in text  # the log's, below
        assert client.sent[-1]["more_body"] is False
        assert await s.store.get("", "s1") is None  # nothing was stored

    with caplog.at_level(logging.WARNING, "hotmodel.api"):
        _run(tmp_path, scenario)
    (logged,) = [r.getMessage() for r in caplog.records if "store" in r.getMessage()]
    assert str(tmp_path / "s.sqlite3") in logged and "request id" in logged


def test_a_dead_port_found_by_chat_is_confirmed_with_the_router_then_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router reads the model ``loaded`` for a moment after its process died (it
    sees the exit within ~50 ms; a recovery then would find it "already running"): the
    watchdog asks again until it reads ``unloaded``, then posts one Recover."""

    async def scenario(s: Services, upstream: Upstream) -> None:
        states = [ModelState.LOADED, ModelState.LOADED, ModelState.UNLOADED]
        asked: list[ModelState] = []
        posted: list[object] = []

        async def models() -> dict[str, ModelStatus]:
            asked.append(states[min(len(asked), len(states) - 1)])
            return {"m": ModelStatus("m", asked[-1])}

        monkeypatch.setattr(s.router, "models", models)
        monkeypatch.setattr(s.controller, "post", lambda command, *_: posted.append(command))
        lost = s.router.on_model_lost  # the watchdog set it
        assert lost is not None
        lost("other")  # not the active model: nothing
        lost("m")
        lost("m")  # one confirmation at a time
        for _ in range(100):
            if posted:
                break
            await asyncio.sleep(0.01)
        assert posted == [Recover("m")] and asked == states
        assert s.watchdog.recoveries == 1
        s.gate.begin_recovery()  # what the Recover command would do, then open it
        s.gate.open()

    _run(tmp_path, scenario)


def test_while_postgresql_is_down_a_session_turn_is_a_503_and_the_rest_is_served(
    tmp_path: Path,
) -> None:
    """A shared store that cannot be reached: a turn of a session fails clearly (503
    ``store_unavailable`` once api/errors.py answers it, nothing sent upstream, no lock
    left), a request without a
    session is served, and once the server is back the session goes on."""
    base = Path(tempfile.mkdtemp(prefix="hotmodel-pg-chat-"))
    base.chmod(0o711)
    server = LocalPostgres(base / "data")
    config = load_config(write_config(tmp_path, {"m": tmp_path / "m.gguf"}, "m"))

    async def turn(s: Services, session: bool) -> Client:
        client = Client(STREAM)
        scope = client.scope()
        if not session:
            scope["headers"] = [h for h in scope["headers"] if h[0] != b"x-session-id"]
        await asyncio.wait_for(ChatCompletions(s)(scope, client.receive, client.send), 20)
        return client

    async def main() -> None:
        upstream = Upstream()
        upstream.finish.set()
        store = PostgresStore(server.url, connect_wait=1.0)
        async with fake_services(config, tmp_path, upstream.handler, store) as s:
            await asyncio.to_thread(server.stop)
            with pytest.raises(StoreUnavailableError) as down:  # api/errors.py answers it
                await turn(s, session=True)
            assert http_error_for(down.value) == HttpError(503, "server_error", "store_unavailable")
            assert "cannot be reached" in down.value.public and server.url not in down.value.public
            assert not upstream.requested.is_set() and len(s.sessions.locks) == 0
            plain = await turn(s, session=False)
            assert plain.sent[0]["status"] == 200 and "data: [DONE]" in plain.text()
            await asyncio.to_thread(server.start)
            back = await turn(s, session=True)
            assert back.sent[0]["status"] == 200 and "data: [DONE]" in back.text()
            stored = await s.store.get("", "s1")
            assert stored is not None and len(stored.messages) == 2
            assert s.gate.inflight() == []

    server.start()
    try:
        asyncio.run(main())
    finally:
        server.stop()
