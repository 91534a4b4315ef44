"""The dashboard's feed hub and the log tail reader, on their own (no server needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hotmodel.api.logs import parse_lines, tail_lines
from hotmodel.control.feed import CLOSED, MODEL, PHASE, REPORT, RESYNC, Feed
from hotmodel.control.report import PhaseStatus, SwitchEvent, SwitchReport
from hotmodel.errors import InvalidRequestError
from hotmodel.router.events import ModelEvent
from hotmodel.router.models import ModelState


def test_every_subscriber_gets_each_event_as_typed_json() -> None:
    async def run() -> None:
        feed = Feed()
        with feed.subscribe() as a, feed.subscribe() as b:
            feed.watch(SwitchEvent(3, "load", PhaseStatus.DONE, 12.5))
            feed.watch(SwitchReport(3, "x", "y", "zero_overlap", "2025-01-01T00:00:00+0000"))
            feed.model_event(ModelEvent("y", "status_change", ModelState.LOADED))
            for sub in (a, b):
                phase, report, model = [await sub.next(1) for _ in range(3)]
                assert phase is not None and phase.kind == PHASE
                assert phase.data == {
                    "switch_id": 3,
                    "phase": "load",
                    "status": "done",
                    "ms": 12.5,
                    "detail": None,
                }
                assert report is not None and report.kind == REPORT
                assert (report.data["id"], report.data["to"]) == (3, "y")
                assert model is not None and model.kind == MODEL
                assert model.data == {"model": "y", "event": "status_change", "status": "loaded"}
            assert feed.subscribers == 2
        assert feed.subscribers == 0  # removed when the block ends

    asyncio.run(run())


def test_a_subscriber_that_falls_behind_never_blocks_and_gets_a_resync() -> None:
    async def run() -> None:
        feed = Feed(maxsize=8)
        with feed.subscribe() as slow:
            for i in range(1000):  # nobody reads: publish must still return at once
                feed.publish(PHASE, {"i": i})
            first = await slow.next(1)
            assert first is not None and first.kind == RESYNC
            rest = []
            while (event := await slow.next(0.01)) is not None:
                rest.append(event.data["i"])
            assert len(rest) <= 8
            assert rest == list(range(1000 - len(rest), 1000))  # only the newest, in order
            assert first.data["dropped"] + len(rest) == 1000

    asyncio.run(run())


def test_an_idle_subscription_times_out_with_none_and_close_ends_it() -> None:
    async def run() -> None:
        feed = Feed()
        with feed.subscribe() as sub:
            assert await sub.next(0.01) is None  # the stream sends a keep-alive then
            feed.publish(PHASE, {})
            feed.close()
            closed = await sub.next(1)
            assert closed is not None and closed.kind == CLOSED  # queued events are moot
            feed.publish(PHASE, {})  # after close nothing more is queued
            assert await sub.next(0.01) is None
        with feed.subscribe() as late:  # a stream opened while stopping ends at once
            event = await late.next(1)
            assert event is not None and event.kind == CLOSED

    asyncio.run(run())


def test_a_broken_listener_does_not_stop_the_others() -> None:
    async def run() -> None:
        feed = Feed()
        with feed.subscribe() as sub:
            sub.close()
            feed.publish(PHASE, {})  # a closed subscription is skipped, not an error
            with feed.subscribe() as other:
                feed.publish(PHASE, {"n": 1})
                event = await other.next(1)
                assert event is not None and event.data == {"n": 1}

    asyncio.run(run())


def _write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_text("\n".join(lines) + end, encoding="utf-8")
    return path


def test_tail_reads_the_last_lines(tmp_path: Path) -> None:
    lines = [f"line {i} " + "x" * (i % 70) for i in range(20_000)]
    path = _write(tmp_path / "a.log", lines)
    assert tail_lines(path, 3) == lines[-3:]
    assert tail_lines(path, 5000) == lines[-5000:]  # several 64 KiB blocks
    assert tail_lines(_write(tmp_path / "b.log", lines[:5], end=""), 2) == lines[3:5]
    assert tail_lines(_write(tmp_path / "c.log", lines[:5]), 100) == lines[:5]
    assert tail_lines(tmp_path / "missing.log", 10) == []
    assert tail_lines(_write(tmp_path / "empty.log", [], end=""), 10) == []


def test_tail_reads_at_most_max_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path / "long.log", ["y" * 1000] * 100)
    got = tail_lines(path, 100, max_bytes=10_500)
    assert 9 <= len(got) <= 11  # about 10 KB worth, never the whole file
    assert got[-1] == "y" * 1000


@pytest.mark.parametrize(
    ("values", "want"), [([], 200), (["1"], 1), (["5000"], 5000), (["0042"], 42)]
)
def test_lines_parameter_accepts(values: list[str], want: int) -> None:
    assert parse_lines(values) == want


@pytest.mark.parametrize(
    "values",
    [["0"], ["5001"], ["-1"], ["1.5"], [""], ["abc"], ["١٢"], ["9" * 40], ["1", "2"], [" 3"]],
)
def test_lines_parameter_refuses(values: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_lines(values)
    assert caught.value.param == "lines"
