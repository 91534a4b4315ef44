"""The boundary to llama-server and the small mechanisms around it, without a router.

SSE parsing, the router client's idempotent commands and error mapping (on
httpx's MockTransport), the model event parser, the traffic gate's admission
context and the per-session lock.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from aiohttp import web

from hotmodel import sse
from hotmodel.control.traffic import TrafficGate
from hotmodel.errors import (
    ModelUnavailableError,
    RouterError,
    RouterTimeoutError,
    RouterUnavailableError,
    SessionBusyError,
    http_error_for,
)
from hotmodel.router.chat_http import ChatHttp
from hotmodel.router.client import RouterClient
from hotmodel.router.events import parse_model_event
from hotmodel.router.models import ModelState
from hotmodel.sessions.locks import SessionLocks
from tests.upstreams import serving

# --- SSE ---


def test_sse_parser_survives_any_chunking() -> None:
    stream = (
        b'data: {"a": 1}\r\n\r\n'
        b"event: phase\ndata: line one\ndata: line two\n\n"
        b": a comment\n\n"
        b"proxy error: Failed to read connection\n"
        b"data: [DONE]\r\n\r\n"
    )
    expected = [
        sse.SseEvent("message", '{"a": 1}'),
        sse.SseEvent("phase", "line one\nline two"),
        sse.SseEvent("message", "[DONE]"),
    ]
    for size in (1, 2, 3, 7, len(stream)):
        parser = sse.SseParser()
        events = []
        for i in range(0, len(stream), size):
            events += parser.feed(stream[i : i + size])
        assert events == expected, size


def test_sse_encode_round_trips() -> None:
    data = sse.encode({"x": "two\nlines"}, "report")
    (event,) = sse.SseParser().feed(data)
    assert event.event == "report" and event.json() == {"x": "two\nlines"}
    (multi,) = sse.SseParser().feed(sse.encode("a\nb"))
    assert multi.data == "a\nb"


def test_model_events_are_parsed_once_into_types() -> None:
    raw = sse.SseEvent(
        "message",
        json.dumps({"model": "g", "event": "status_change", "data": {"status": "loading"}}),
    )
    event = parse_model_event(raw)
    assert event is not None and (event.model, event.state) == ("g", ModelState.LOADING)
    assert parse_model_event(sse.SseEvent("message", "not json")) is None
    assert parse_model_event(sse.SseEvent("message", "[1, 2]")) is None
    odd = parse_model_event(
        sse.SseEvent("message", '{"model": "g", "data": {"status": "teleporting"}}')
    )
    assert odd is not None and odd.state is ModelState.UNKNOWN


# --- the router client ---


def _client(handler: Any, request_timeout: float = 600.0) -> RouterClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return RouterClient(http, "http://router", request_timeout)


def _refuse(message: str) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"code": 400, "message": message}})

    return handler


def test_load_and_unload_are_idempotent() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        running = await _client(_refuse("model is already running")).load("m")
        stopped = await _client(_refuse("model is not running")).unload("m")
        sent = await _client(lambda r: httpx.Response(200, json={"success": True})).load("m")
        return running, stopped, sent

    assert asyncio.run(scenario()) == (False, False, True)


def test_other_command_refusals_are_errors() -> None:
    with pytest.raises(RouterError, match=r"POST /models/load for 'm' answered 400: model is not"):
        asyncio.run(_client(_refuse("model is not found")).load("m"))


def _chat_client(base_url: str, chat_http: ChatHttp, direct: bool = False) -> RouterClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    return RouterClient(
        http, base_url, chat_http.request_timeout, direct=direct, chat_http=chat_http
    )


def test_a_slow_answer_names_the_setting_that_bounds_it() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(10)
        return web.Response()

    async def scenario() -> None:
        async with (
            serving(handler) as url,
            ChatHttp(0.3) as chat_http,
            _chat_client(url, chat_http).chat(b"{}"),
        ):
            pass

    with pytest.raises(RouterTimeoutError) as info:
        asyncio.run(scenario())
    message = str(info.value)
    assert "did not answer within 0.3s ([server] request_timeout_seconds)" in message
    assert "could not be reached" not in message
    assert http_error_for(info.value).status == 504


def test_an_unreachable_router_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(RouterUnavailableError, match="GET /models: llama-server could not be"):
        asyncio.run(_client(handler).models())


def test_a_stream_that_breaks_midway_is_a_router_error() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"data: {}\n\n")
        assert request.transport is not None
        request.transport.abort()  # the connection resets mid-answer
        return resp

    async def scenario() -> list[bytes]:
        seen = []
        async with (
            serving(handler) as url,
            ChatHttp(5) as chat_http,
            _chat_client(url, chat_http).chat(b"{}") as upstream,
        ):
            async for chunk in upstream.chunks():
                seen.append(chunk)
        return seen

    with pytest.raises(RouterUnavailableError, match="connection to llama-server broke"):
        asyncio.run(scenario())


# --- admission and session locks ---


def test_admission_returns_the_ticket_on_errors_and_cancellation() -> None:
    async def scenario() -> None:
        gate = TrafficGate()
        with pytest.raises(ValueError, match="boom"):
            async with gate.admit(1):
                raise ValueError("boom")
        assert gate.inflight() == []
        inside = asyncio.Event()

        async def held() -> None:
            async with gate.admit(1):
                inside.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(held())
        await inside.wait()
        assert len(gate.inflight()) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.inflight() == []
        # a drain right after finds nothing in flight
        assert await gate.drain(None, 0.01)

    asyncio.run(scenario())


def test_session_lock_serializes_one_session_and_not_others() -> None:
    async def scenario() -> list[str]:
        locks = SessionLocks()
        order: list[str] = []
        first_in = asyncio.Event()
        release = asyncio.Event()

        async def turn(session: str, name: str, wait: bool) -> None:
            async with locks.hold(session, 5):
                order.append(f"{name} in")
                if wait:
                    first_in.set()
                    await release.wait()
                order.append(f"{name} out")

        first = asyncio.create_task(turn("s", "first", True))
        await first_in.wait()
        second = asyncio.create_task(turn("s", "second", False))
        await turn("other", "other", False)  # not held up by s
        release.set()
        await asyncio.gather(first, second)
        assert len(locks) == 0  # nothing kept for idle sessions
        return order

    assert asyncio.run(scenario()) == [
        "first in",
        "other in",
        "other out",
        "first out",
        "second in",
        "second out",
    ]


def test_session_lock_wait_is_bounded() -> None:
    async def scenario() -> None:
        locks = SessionLocks()
        async with locks.hold("s", 1):
            with pytest.raises(SessionBusyError, match=r"\[session\] queue_timeout_seconds"):
                async with locks.hold("s", 0.01):
                    pass
        assert len(locks) == 0

    asyncio.run(scenario())


def test_chat_goes_to_the_model_directly_and_a_dead_port_is_the_models_loss() -> None:
    """A model's own server whose port refuses connections is gone (a crash: an unload
    drops the port first): 503 ``model_unavailable``, the port forgotten, the loss
    reported (the watchdog loads the model again); the router is not asked, as it
    would answer "proxy error" until it notices the exit."""
    seen: list[str] = []
    lost: list[str] = []

    def answering(name: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            seen.append(name)
            return web.json_response({"ok": name})

        return handler

    async def ask(client: RouterClient) -> Any:
        async with client.chat(b"{}", model="m") as upstream:
            return json.loads(await upstream.read())

    async def scenario() -> None:
        async with serving(answering("router")) as router_url, ChatHttp(5) as chat_http:
            client = _chat_client(router_url, chat_http, direct=True)
            client.on_model_lost = lost.append
            assert await ask(client) == {"ok": "router"}  # port unknown: the router
            async with serving(answering("child")) as child_url:
                client.set_direct("m", int(child_url.rsplit(":", 1)[1]))
                assert await ask(client) == {"ok": "child"}  # straight to the model's server
            # it died (its port refuses): the model is unavailable, its port forgotten
            with pytest.raises(ModelUnavailableError) as info:
                await ask(client)
            assert http_error_for(info.value).status == 503
            assert child_url.rsplit(":", 1)[1] not in info.value.public  # the log's
            assert child_url.rsplit(":", 1)[1] in str(info.value)
            assert client.direct == {} and lost == ["m"]
            assert await ask(client) == {"ok": "router"}  # until it is loaded again
            client.set_direct("m", 4001)
            client.drop_direct("m")  # an unload begins: nothing may reach it directly
            assert await ask(client) == {"ok": "router"}
            off = _chat_client(router_url, chat_http, direct=False)
            off.set_direct("m", 4001)
            assert off.direct == {}  # [router] direct = false

    asyncio.run(scenario())
    assert seen == ["router", "child", "router", "router"]
    assert lost == ["m"]
