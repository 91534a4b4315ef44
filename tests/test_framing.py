"""The HTTP protocol's own answers (api/framing.py), on a real uvicorn server in this process.

A tiny ASGI app stands in for hotmodel's: what is tested happens before any app
is called. Short bounds (a subclass) keep the tests fast; the real server's
defaults are checked in test_serve_real.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from hotmodel.api.framing import HttpProtocol
from hotmodel.router.supervisor import free_port


class Quick(HttpProtocol):
    head_timeout = 0.3
    max_head_bytes = 2048


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(0.8)
    if scope["path"] == "/stream":  # no length: uvicorn frames it itself
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"data: 1\n\n", b"", b"data: 2\n\n"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    answer = json.dumps({"path": scope["path"], "body": len(body)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    port = free_port("127.0.0.1")
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=Quick, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    yield port
    server.should_exit = True
    thread.join(10)


def exchange(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send ``parts`` (``pause`` between them), read until the server closes; the bytes.
    A server that never closes fails it (the socket's 10 s timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for part in parts:
            sock.sendall(part)
            time.sleep(pause)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def error_of(answer: bytes, status: bytes) -> dict[str, Any]:
    head, _, body = answer.rpartition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].startswith(b"HTTP/1.1 " + status), answer
    assert b"content-type: application/json" in head.lower()
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(port: int) -> None:
    answer = exchange(port)
    assert answer == b""  # closed by the server (a socket that stayed open would time out)


def test_a_head_that_stops_coming_gets_a_408(port: int) -> None:
    answer = exchange(port, b"GET /a HTTP/1.1\r\nHost: x\r\n")
    assert error_of(answer, b"408")["code"] == "request_timeout"


def test_the_next_head_on_a_kept_alive_connection_has_the_same_deadline(port: int) -> None:
    answer = exchange(port, GET, b"GET /b HTTP/1.1\r\nHo", pause=0.1)
    first, _, rest = answer.partition(b"}")
    assert first.startswith(b"HTTP/1.1 200") and b'"path": "/a"' in first + b"}"
    assert error_of(rest, b"408")["code"] == "request_timeout"


def test_a_pipelined_head_waits_for_the_running_request(port: int) -> None:
    """The deadline passes while /slow runs: its answer comes whole, then the 408."""
    answer = exchange(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n")
    first, _, rest = answer.partition(b"}")
    assert first.startswith(b"HTTP/1.1 200") and b'"path": "/slow"' in first + b"}"
    assert error_of(rest, b"408")["code"] == "request_timeout"


def test_headers_over_the_bound_get_a_431(port: int) -> None:
    big = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
    assert error_of(exchange(port, big), b"431")["code"] == "request_header_too_large"
    many = b"GET /a HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(400)) + b"\r\n"
    assert error_of(exchange(port, many), b"431")["code"] == "request_header_too_large"
    long_url = b"GET /" + b"a" * 4096 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert error_of(exchange(port, long_url), b"431")["code"] == "request_header_too_large"


def test_a_large_body_is_not_counted_as_head(port: int) -> None:
    body = b"x" * 100_000
    request = b"POST /p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    request += b"Content-Length: %d\r\n\r\n" % len(body) + body
    answer = exchange(port, request)
    assert answer.startswith(b"HTTP/1.1 200") and b'"body": 100000' in answer


def test_bytes_that_are_not_http_get_a_json_400(port: int) -> None:
    error = error_of(exchange(port, b"NOT HTTP\r\n\r\n"), b"400")
    assert error["code"] == "http_400" and "HTTP/1.1" in error["message"]


def test_a_stream_to_an_http_10_client_ends_with_the_close_not_in_chunks(port: int) -> None:
    answer = exchange(port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"data: 1\n\ndata: 2\n\n"
    # HTTP/1.1 keeps its chunks (and the connection)
    answer = exchange(port, b"GET /stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"
    # a response with a length is sent as before, to both
    answer = exchange(port, b"POST /x HTTP/1.0\r\ncontent-length: 2\r\n\r\nab")
    assert answer.endswith(b'{"path": "/x", "body": 2}') and b"content-length: 25" in answer
