"""One error boundary to llama-server, whichever library made the call.

The control calls go over httpx, the chat data path over aiohttp; both meet
the same failures on real sockets here (a closed port, a server that accepts
and closes, one that never answers, one that answers something that is not
HTTP, one that breaks off its answer) and must raise the same hotmodel error
with the same public wording, the library's text kept for the log only. And no
module outside ``router/`` catches an httpx or aiohttp exception.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import pytest

from hotmodel.errors import (
    HotModelError,
    RouterError,
    RouterRefusedError,
    RouterTimeoutError,
    RouterUnavailableError,
    http_error_for,
)
from hotmodel.router.boundary import WORDING, Failure, boundary, failure_of, stale
from hotmodel.router.chat_http import REQUEST_SETTING, ChatHttp
from hotmodel.router.client import RouterClient
from hotmodel.router.supervisor import free_port

SRC = Path(__file__).resolve().parent.parent / "src" / "hotmodel"
TIMEOUT = 0.3
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    await reader.readexactly(length)


async def _closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)  # accepted and read, then closed without a word


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    await reader.read()  # never answers; ends when the client gives up


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"this is not HTTP\r\n\r\n")
    await writer.drain()


async def _cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(HEAD + b'{"choices": [')  # 100 bytes announced, a few sent
    await writer.drain()


@contextlib.asynccontextmanager
async def _server(behaviour: Behaviour, connections: list[int]) -> AsyncIterator[str]:
    """A raw TCP server on a free port doing ``behaviour`` on each connection."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await behaviour(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"
        server.close()


async def _via_httpx(url: str) -> None:
    """A control call with a body (prefill): httpx."""
    async with httpx.AsyncClient() as http:
        client = RouterClient(http, url)
        await client.prefill("m", [{"role": "user", "content": "hi"}], TIMEOUT, REQUEST_SETTING)


async def _via_aiohttp(url: str) -> None:
    """The chat data path, the whole answer read: aiohttp."""
    async with ChatHttp(TIMEOUT) as chat_http, httpx.AsyncClient() as http:
        client = RouterClient(http, url, TIMEOUT, chat_http=chat_http)
        async with client.chat(b"{}") as upstream:
            await upstream.read()


async def _fail(
    behaviour: Behaviour | None, call: Callable[[str], Awaitable[None]]
) -> tuple[HotModelError, int]:
    """What ``call`` raises against ``behaviour`` (None: a closed port), and how many
    connections the server saw."""
    connections: list[int] = []
    try:
        if behaviour is None:
            await call(f"http://127.0.0.1:{free_port('127.0.0.1')}")
        else:
            async with _server(behaviour, connections) as url:
                await call(url)
    except HotModelError as exc:
        return exc, len(connections)
    raise AssertionError("the call did not fail")


CASES = {
    # behaviour: (error type, public wording after "POST /v1/chat/completions: ", attempts)
    "closed port": (None, RouterRefusedError, "llama-server could not be reached", 0),
    "accepts and closes": (
        _closes,
        RouterUnavailableError,
        "the connection to llama-server broke",
        2,  # a stale kept-alive connection looks the same: sent once more, on a new one
    ),
    "never answers": (
        _silent,
        RouterTimeoutError,
        f"llama-server did not answer within {TIMEOUT:g}s ({REQUEST_SETTING})",
        1,
    ),
    "answers not HTTP": (
        _garbage,
        RouterUnavailableError,
        "the connection to llama-server broke",
        1,
    ),
    "breaks off its answer": (
        _cut,
        RouterUnavailableError,
        "the connection to llama-server broke",
        1,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_both_libraries_fail_the_same_way_with_the_same_words(case: str) -> None:
    behaviour, kind, words, attempts = CASES[case]

    async def scenario() -> list[tuple[HotModelError, int]]:
        return [await _fail(behaviour, _via_httpx), await _fail(behaviour, _via_aiohttp)]

    (by_httpx, seen_httpx), (by_aiohttp, seen_aiohttp) = asyncio.run(scenario())
    for error in (by_httpx, by_aiohttp):
        assert type(error) is kind, (case, error)
        assert error.public == f"POST /v1/chat/completions: {words}", case
        assert "127.0.0.1" not in error.public  # the address is the log's
        assert error.detail  # the library's own text, for the log
        assert isinstance(error.__cause__, httpx.HTTPError | aiohttp.ClientError | TimeoutError)
    assert (seen_httpx, seen_aiohttp) == (attempts, attempts), case
    assert http_error_for(by_httpx) == http_error_for(by_aiohttp)


def test_a_refused_connection_names_the_address_in_the_log_only() -> None:
    port = free_port("127.0.0.1")

    async def scenario() -> list[HotModelError]:
        errors: list[HotModelError] = []
        for call in (_via_httpx, _via_aiohttp):
            with pytest.raises(RouterRefusedError) as info:
                await call(f"http://127.0.0.1:{port}")
            errors.append(info.value)
        return errors

    for error in asyncio.run(scenario()):
        assert f"127.0.0.1:{port}" in str(error) and str(port) not in error.public
        assert http_error_for(error).status == 503


def test_every_kind_has_one_error_and_one_wording() -> None:
    assert set(WORDING) == set(Failure)
    for cls, _ in WORDING.values():
        assert issubclass(cls, RouterError)
    request = httpx.Request("GET", "http://router/models")
    kinds = {
        httpx.ConnectTimeout("t", request=request): Failure.CONNECT_TIMEOUT,
        aiohttp.ConnectionTimeoutError("t"): Failure.CONNECT_TIMEOUT,
        httpx.ReadTimeout("t", request=request): Failure.TIMEOUT,
        aiohttp.SocketTimeoutError("t"): Failure.TIMEOUT,
        TimeoutError(): Failure.TIMEOUT,
        httpx.ConnectError("refused", request=request): Failure.REFUSED,
        httpx.RemoteProtocolError("x", request=request): Failure.DISCONNECTED,
        aiohttp.ServerDisconnectedError(): Failure.DISCONNECTED,
        aiohttp.ClientPayloadError("x"): Failure.DISCONNECTED,
        httpx.UnsupportedProtocol("x", request=request): Failure.TRANSPORT,
        aiohttp.InvalidURL("x"): Failure.TRANSPORT,
        ValueError("x"): None,
    }
    for exc, kind in kinds.items():
        assert failure_of(exc) is kind, exc
    with (
        pytest.raises(RouterUnavailableError, match="GET /x: llama-server did not accept a"),
        boundary("GET /x", 1, "s"),
    ):
        raise aiohttp.ConnectionTimeoutError("t")
    with (
        pytest.raises(ValueError, match="a bug"),  # not the libraries': passed on as it is
        boundary("GET /x", 1, "s"),
    ):
        raise ValueError("a bug")


def test_only_a_request_llama_server_never_read_is_stale() -> None:
    request = httpx.Request("POST", "http://router/x")
    unread = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    assert stale(unread) and stale(aiohttp.ServerDisconnectedError())
    assert stale(aiohttp.ClientOSError(32, "Broken pipe"))
    assert not stale(httpx.RemoteProtocolError("peer closed connection", request=request))
    assert not stale(httpx.ConnectError("refused", request=request))
    assert not stale(aiohttp.SocketTimeoutError("t"))


# --- no library's exception outside router/ ---

# cli/ is a client of hotmodel's own HTTP API (never of llama-server): its httpx
# errors are its own boundary (cli/common.py turns them into exit codes); so is
# cluster/peer.py, the boundary to the other nodes of a cluster.
_PEERS = SRC / "cluster" / "peer.py"
_OUTSIDE = [p for p in SRC.rglob("*.py") if p.parent.name not in ("router", "cli") and p != _PEERS]


def _names_a_library(node: ast.expr | None) -> bool:
    return node is not None and any(
        isinstance(n, ast.Name) and n.id in ("httpx", "aiohttp") for n in ast.walk(node)
    )


def test_no_httpx_or_aiohttp_exception_is_caught_outside_router() -> None:
    found = []
    for path in _OUTSIDE:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and _names_a_library(node.type):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module in ("httpx", "aiohttp"):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} (from-import)")
    assert found == []


def test_only_router_and_runtime_use_the_http_libraries() -> None:
    """runtime.py builds the pooled httpx client; nothing else outside router/ touches
    either library, so none of their exceptions can arise (and escape) there."""
    users = sorted(
        str(path.relative_to(SRC))
        for path in _OUTSIDE
        if any(
            isinstance(node, ast.Import) and node.names[0].name in ("httpx", "aiohttp")
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        )
    )
    assert users == ["runtime.py"]
