"""The request record, the access line, the JSON log format and the Observe middleware,
without a router: token counts from llama-server's real answer shapes, request ids,
route labels, and one id per request shared by the 500 handler, the header and the log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from hotmodel.api import metrics as metrics_module
from hotmodel.api.errors import CatchUnexpected
from hotmodel.api.metrics import GpuReader, Metrics, gpu_metrics
from hotmodel.api.observe import AccessLine, Observe
from hotmodel.api.record import RequestRecord, Usage, has_text, incoming_request_id, usage_of
from hotmodel.config import ServerConfig
from hotmodel.control.gpu import GpuDevice, GpuReading, NoGpu
from hotmodel.logs import JsonFormatter, setup_logging

# What llama-server sent (trimmed ids): a plain answer, then the ends of streams.
PLAIN = (
    b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant",'
    b'"content":"say \\"prompt_tokens\\":99"}}],"object":"chat.completion",'
    b'"usage":{"completion_tokens":5,"prompt_tokens":31,"total_tokens":36,'
    b'"prompt_tokens_details":{"cached_tokens":0}},"id":"chatcmpl-x",'
    b'"timings":{"cache_n":0,"prompt_n":31,"prompt_ms":99.0,"predicted_n":5,"predicted_ms":28.2}}'
)
STREAM_END = (
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],'
    b'"object":"chat.completion.chunk","timings":{"cache_n":30,"prompt_n":1,'
    b'"prompt_ms":7.1,"predicted_n":3,"predicted_ms":13.1}}\n\ndata: [DONE]\n\n'
)
STREAM_USAGE_END = (
    b'data: {"choices":[],"object":"chat.completion.chunk","usage":{"completion_tokens":3,'
    b'"prompt_tokens":31,"total_tokens":34,"prompt_tokens_details":{"cached_tokens":30}},'
    b'"timings":{"cache_n":30,"prompt_n":1,"predicted_n":3}}\n\ndata: [DONE]\n\n'
)
PER_TOKEN = (
    b'data: {"choices":[{"delta":{"content":"I"}}],"timings":{"cache_n":30,"prompt_n":1,'
    b'"predicted_n":1}}\n\ndata: {"choices":[{"delta":{"content":" you"}}],'
    b'"timings":{"cache_n":30,"prompt_n":1,"predicted_n":2}}\n\n'
)

# the same from /v1/responses and /v1/messages (llama-server's own, trimmed)
RESPONSES_PLAIN = (
    b'{"id":"resp_x","object":"response","output":[{"content":[{"type":"output_text",'
    b'"text":"say \\"input_tokens\\":99"}],"role":"assistant","type":"message"}],'
    b'"status":"completed","usage":{"input_tokens":33,"output_tokens":8,"total_tokens":41,'
    b'"input_tokens_details":{"cached_tokens":32}}}'
)
RESPONSES_STREAM_END = (
    b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r",'
    b'"usage":{"input_tokens":33,"output_tokens":8,"total_tokens":41,"input_tokens_details":'
    b'{"cached_tokens":32}}},"timings":{"cache_n":32,"prompt_n":1,"predicted_n":8}}\n\n'
)
MESSAGES_PLAIN = (
    b'{"id":"chatcmpl-x","type":"message","role":"assistant","content":[{"type":"text",'
    b'"text":"Hi"}],"stop_reason":"max_tokens","usage":{"cache_read_input_tokens":32,'
    b'"input_tokens":1,"output_tokens":8}}'
)
MESSAGES_START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","content":[],'
    b'"usage":{"cache_read_input_tokens":32,"input_tokens":1,"output_tokens":0}}}\n\n'
)
MESSAGES_STREAM_END = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},'
    b'"usage":{"output_tokens":8}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (PLAIN, Usage(31, 5, 0)),
        (STREAM_END, Usage(31, 3, 30)),
        (STREAM_USAGE_END, Usage(31, 3, 30)),
        (PER_TOKEN, Usage(31, 2, 30)),  # the last timings win
        (b'{"usage":{"prompt_tokens":7,"completion_tokens":2}}', Usage(7, 2, 0)),
        (RESPONSES_PLAIN, Usage(33, 8, 32)),  # input_tokens: the whole prompt
        (RESPONSES_STREAM_END, Usage(33, 8, 32)),  # its timings, as chat's
        (MESSAGES_PLAIN, Usage(33, 8, 32)),  # Anthropic's input_tokens leave the cache out
        (MESSAGES_STREAM_END, Usage(0, 8, 0)),  # the prompt's counts were in its first event
        (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', None),
        (b'{"error":{"message":"bad"}}', None),
        (b"", None),
    ],
)
def test_usage_from_the_end_of_an_answer(data: bytes, expected: Usage | None) -> None:
    assert usage_of(data) == expected


def test_usage_split_over_chunks_is_found_in_the_joined_tail() -> None:
    cut = len(STREAM_END) // 2
    assert usage_of(b"".join((STREAM_END[:cut], STREAM_END[cut:], b""))) == Usage(31, 3, 30)


def test_an_anthropic_streams_counts_join_its_first_and_last_events() -> None:
    record = RequestRecord.detached()
    record.opening = usage_of(MESSAGES_START)
    assert record.opening == Usage(33, 0, 32)
    record.upstream_done(MESSAGES_STREAM_END)
    assert record.usage == Usage(33, 8, 32)


def test_first_text_is_content_not_the_role_chunk() -> None:
    assert not has_text(b'data: {"choices":[{"delta":{"role":"assistant","content":null}}]}')
    assert has_text(b'data: {"choices":[{"delta":{"content":"Hello"}}]}')
    assert has_text(b'data: {"choices":[{"delta":{"reasoning_content":"Hmm"}}]}')
    assert has_text(b'data: {"type":"response.output_text.delta","delta":"Hi"}')  # Responses


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123_X.y", "abc-123_X.y"),
        ("a" * 64, "a" * 64),
        ("a" * 65, None),
        ("has space", None),
        ('quote"', None),
        ("", None),
    ],
)
def test_incoming_request_id_only_when_short_and_safe(sent: str, kept: str | None) -> None:
    scope = {"headers": [(b"x-request-id", sent.encode())]}
    assert incoming_request_id(scope) == kept


def test_access_line_quotes_what_could_forge_a_field() -> None:
    line = str(AccessLine({"path": "/a b\nstatus=200", "model": None, "ms": 1.5}))
    assert line == 'path="/a b\\nstatus=200" model=- ms=1.5'
    assert "\n" not in line


def test_json_formatter_one_object_per_line_with_access_fields() -> None:
    fmt = JsonFormatter()
    plain = logging.LogRecord("hotmodel.x", logging.WARNING, "f", 1, "two\nlines %s", ("a",), None)
    out = fmt.format(plain)
    assert "\n" not in out
    obj = json.loads(out)
    assert obj["level"] == "warning" and obj["logger"] == "hotmodel.x"
    assert obj["message"] == "two\nlines a" and obj["time"].endswith("+00:00")
    fields = {"request_id": "r1", "method": "GET", "path": "/health", "status": 200, "ms": 1.0}
    access = logging.LogRecord("hotmodel.access", logging.INFO, "f", 1, "%s", (".",), None)
    access.access = fields
    obj = json.loads(fmt.format(access))
    assert obj["message"] == "GET /health 200"
    assert {k: obj[k] for k in fields} == fields


def test_setup_logging_replaces_its_own_handler_and_keeps_others() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    other = logging.NullHandler()
    root.addHandler(other)
    try:
        first, second = io.StringIO(), io.StringIO()
        setup_logging(ServerConfig(log_format="text"), first)
        setup_logging(ServerConfig(log_format="json"), second)
        logging.getLogger("hotmodel.test").warning("hello")
        assert first.getvalue() == ""
        assert json.loads(second.getvalue())["message"] == "hello"
        assert other in root.handlers
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _app(metrics: Metrics) -> Starlette:
    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def boom(request: Request) -> Response:
        raise RuntimeError("internal detail")

    return Starlette(
        routes=[
            Route("/ok", ok),
            Route("/items/{item_id}", ok),
            Route("/boom", boom),
        ],
        middleware=[Middleware(Observe, metrics=metrics), Middleware(CatchUnexpected)],
    )


def _samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.exposition import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_one_request_id_for_header_500_body_and_access_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    with TestClient(_app(metrics), raise_server_exceptions=False) as client:
        caplog.set_level(logging.INFO, "hotmodel.access")
        resp = client.get("/boom", headers={"x-request-id": "given-1"})
        assert resp.status_code == 500
        assert resp.headers.get_list("x-request-id") == ["given-1"]
        assert "given-1" in resp.json()["error"]["message"]
        assert "internal detail" not in resp.text
        fresh = client.get("/ok", headers={"x-request-id": "not safe!"})
        rid = fresh.headers["x-request-id"]
        assert rid != "not safe!" and len(rid) == 16
    lines = [r.access for r in caplog.records if r.name == "hotmodel.access"]  # type: ignore[attr-defined]
    assert [(line["request_id"], line["status"], line["route"]) for line in lines] == [
        ("given-1", 500, "/boom"),
        (rid, 200, "/ok"),
    ]


def test_a_request_that_ends_without_an_answer_counts_as_499(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Gone:  # an ASGI app, as the chat endpoint is
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            return  # as the chat path does when the client left before the answer

    metrics = Metrics()
    app = Starlette(
        routes=[Route("/gone", Gone(), methods=["POST"])],
        middleware=[Middleware(Observe, metrics=metrics), Middleware(CatchUnexpected)],
    )
    caplog.set_level(logging.INFO, "hotmodel.access")

    async def call() -> None:
        scope: Scope = {"type": "http", "method": "POST", "path": "/gone", "headers": []}
        scope.update(query_string=b"", root_path="")

        async def receive() -> Message:
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            raise AssertionError(f"nothing is sent: {message}")

        await app(scope, receive, send)

    asyncio.run(call())
    labels = frozenset({"route": "/gone", "method": "POST", "status": "499"}.items())
    assert _samples(metrics)[("hotmodel_requests_total", labels)] == 1
    [line] = [r.access for r in caplog.records if r.name == "hotmodel.access"]  # type: ignore[attr-defined]
    assert line["status"] == 499 and line["upstream_ms"] is None


def test_route_labels_are_templates_and_unknown_paths_are_other() -> None:
    metrics = Metrics()
    with TestClient(_app(metrics)) as client:
        for path in ("/ok", "/items/1", "/items/2", "/random/404/a", "/random/404/b"):
            client.get(path)
        client.post("/ok")  # 405: a known route, wrong method
    samples = _samples(metrics)

    def count(route: str, method: str, status: str) -> float:
        labels = frozenset({"route": route, "method": method, "status": status}.items())
        return samples.get(("hotmodel_requests_total", labels), 0.0)

    assert count("/ok", "GET", "200") == 1
    assert count("/items/{item_id}", "GET", "200") == 2
    assert count("other", "GET", "404") == 2
    assert count("/ok", "POST", "405") == 1
    routes = {dict(labels).get("route") for name, labels in samples if "route" in dict(labels)}
    assert routes == {"/ok", "/items/{item_id}", "other"}


class _Probe:
    """A GPU probe whose reading waits until the test lets it go."""

    name = "fake"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.reads = 0

    def read(self) -> GpuReading | None:
        self.release.wait(30)
        self.reads += 1
        return GpuReading((GpuDevice(0, "Fake GPU, 80GB", 1024 * self.reads, 81920),), "fake")


def test_gpu_reading_never_holds_a_scrape_and_runs_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "GPU_READ_TIMEOUT_S", 0.05)
    probe = _Probe()
    reader = GpuReader(probe)

    async def scenario() -> None:
        assert await reader.read() is None  # still reading: no value yet, the scrape goes on
        first = reader._pending
        assert await reader.read() is None
        assert reader._pending is first  # the same read is awaited, not a second thread
        probe.release.set()
        for _ in range(200):  # until the pending read lands (at most 30 s of waiting)
            snap = await reader.read()
            if snap is not None:
                break
        assert snap is not None and snap.used_mib == 1024

    asyncio.run(scenario())
    assert probe.reads == 1


def test_no_gpu_probe_reads_nothing() -> None:
    assert asyncio.run(GpuReader(NoGpu()).read()) is None
    assert list(gpu_metrics(None)) == []


def test_gpu_memory_in_bytes_per_device() -> None:
    snap = GpuReading((GpuDevice(0, "A, B", 1, 2), GpuDevice(1, "C", 3, 4)), "nvml")
    samples = {
        (s.name, s.labels["gpu"], s.labels["name"]): s.value
        for family in gpu_metrics(snap)
        for s in family.samples
    }
    mib = 1 << 20
    assert samples == {
        ("hotmodel_gpu_memory_used_bytes", "0", "A, B"): 1 * mib,
        ("hotmodel_gpu_memory_used_bytes", "1", "C"): 3 * mib,
        ("hotmodel_gpu_memory_total_bytes", "0", "A, B"): 2 * mib,
        ("hotmodel_gpu_memory_total_bytes", "1", "C"): 4 * mib,
    }


def test_an_open_feed_is_counted_but_kept_out_of_the_duration_histogram() -> None:
    """A dashboard keeps /admin/events open for hours: its length would swamp the latency
    buckets, so it is counted as a request and not timed."""
    m = Metrics()
    now = time.perf_counter()
    for route in ("/admin/events", "/admin/status"):
        record = RequestRecord("id", "GET", route, now - 3600, route=route, status=200)
        m.request_done(record, now)
    samples = {
        (s.name, s.labels.get("route")): s.value
        for family in text_string_to_metric_families(generate_latest(m.registry).decode())
        for s in family.samples
    }
    for route in ("/admin/events", "/admin/status"):
        assert samples[("hotmodel_requests_total", route)] == 1
    assert samples[("hotmodel_request_duration_seconds_count", "/admin/status")] == 1
    assert ("hotmodel_request_duration_seconds_count", "/admin/events") not in samples


def test_server_timing_splits_hotmodel_from_upstream() -> None:
    """``Server-Timing`` gives a client hotmodel's own share of a request apart from
    llama-server's: the whole time before the upstream call, then without the upstream."""
    record = RequestRecord("id", "POST", "/v1/chat/completions", 100.0)
    assert record.server_timing(100.004) == b"hotmodel;dur=4.000"
    record.upstream_started, record.upstream_ended = 100.001, 100.011
    assert record.server_timing(100.0125) == b"hotmodel;dur=2.500, upstream;dur=10.000"
    with TestClient(_app(Metrics())) as client:
        header = client.get("/ok").headers["server-timing"]
    name, _, duration = header.partition(";dur=")
    assert name == "hotmodel" and 0 <= float(duration) < 60_000
