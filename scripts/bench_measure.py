"""Sections of scripts/bench.py that measure one running `hotmodel serve` against
its own router and the loaded model's own process: proxy, throughput, history, rss.

Every figure is taken on the three paths interleaved (round-robin per request,
or per block for throughput) so that drift of the machine hits all three alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from bench_common import (
    MB,
    PATHS,
    PLAIN,
    Paths,
    RssSampler,
    Settings,
    clients,
    gaps,
    idle_rss_mb,
    rotate,
    stream_body,
)
from bench_history import fill, timed_turn
from bench_proxy import RETRIES, plain_ms, stream_times
from benchlib import summary


def proxy(paths: Paths, s: Settings) -> dict[str, Any]:
    """Plain 1-token requests, and 32-token streams (first byte, gaps between chunks)."""
    plain: dict[str, list[float]] = {p: [] for p in PATHS}
    first: dict[str, list[float]] = {p: [] for p in PATHS}
    gap: dict[str, list[float]] = {p: [] for p in PATHS}
    chunks: dict[str, list[int]] = {p: [] for p in PATHS}
    stream = stream_body(s.stream_tokens)
    RETRIES.clear()
    with contextlib.ExitStack() as stack:
        client = {
            p: stack.enter_context(c) for p, c in zip(PATHS, clients(auth=paths.auth), strict=True)
        }
        for _ in range(5):  # warm every path, its connection and the prompt cache
            for p in PATHS:
                plain_ms(client[p], paths.url(p), PLAIN)
        for i in range(s.proxy_rounds):
            for p in rotate(PATHS, i):
                plain[p].append(plain_ms(client[p], paths.url(p), PLAIN))
            for p in rotate(PATHS, i + 1):
                first_ms, events = stream_times(client[p], paths.url(p), stream)
                first[p].append(first_ms)
                gap[p].extend(gaps(events))
                chunks[p].append(len(events))
    return {
        "rounds": s.proxy_rounds,
        "stream_max_tokens": s.stream_tokens,
        "paths": {
            p: {
                "plain": summary(plain[p]),
                "stream_first_byte": summary(first[p]),
                "chunk_gap": summary(gap[p]),
                "events_per_stream": statistics.fmean(chunks[p]),
            }
            for p in PATHS
        },
        "retries_on_closed_keepalive": {
            p: RETRIES.get(paths.url(p), 0) for p in PATHS if RETRIES.get(paths.url(p))
        },
    }


async def _worker(
    client: httpx.AsyncClient, url: str, deadline: float, errors: Counter[str]
) -> int:
    done = 0
    while time.perf_counter() < deadline:
        try:
            answer = await client.post(url + "/v1/chat/completions", json=PLAIN)
        except httpx.TransportError as exc:
            errors[type(exc).__name__] += 1
            continue
        if answer.status_code == 200:
            done += 1
        else:
            errors[f"HTTP {answer.status_code}"] += 1
    return done


async def _block(
    group: list[httpx.AsyncClient], url: str, seconds: float, errors: Counter[str]
) -> tuple[int, float]:
    """Every client of ``group`` sends back-to-back requests for ``seconds``: the answers
    that came (failures counted into ``errors``), and the time until the last one came."""
    t0 = time.perf_counter()
    done = await asyncio.gather(*(_worker(c, url, t0 + seconds, errors) for c in group))
    return sum(done), time.perf_counter() - t0


async def _warm(group: list[httpx.AsyncClient], url: str) -> None:
    """One request per client: every connection open before the clock starts."""
    # a failure here (the router closing a kept-alive connection) only leaves it unopened
    await asyncio.gather(
        *(c.post(url + "/v1/chat/completions", json=PLAIN) for c in group), return_exceptions=True
    )


async def _level(paths: Paths, n: int, s: Settings) -> dict[str, Any]:
    group = {
        p: [httpx.AsyncClient(timeout=120, trust_env=False, headers=paths.auth) for _ in range(n)]
        for p in PATHS
    }
    done = dict.fromkeys(PATHS, 0)
    seconds = dict.fromkeys(PATHS, 0.0)
    errors: dict[str, Counter[str]] = {p: Counter() for p in PATHS}
    try:
        for p in PATHS:
            await _warm(group[p], paths.url(p))
        for b in range(s.throughput_blocks):
            for p in rotate(PATHS, b):
                block_s = s.throughput_seconds / s.throughput_blocks
                got, took = await _block(group[p], paths.url(p), block_s, errors[p])
                done[p] += got
                seconds[p] += took
    finally:
        for p in PATHS:
            for c in group[p]:
                await c.aclose()
    return {
        p: {
            "requests": done[p],
            "errors": sum(errors[p].values()),
            "error_kinds": dict(errors[p]),
            "seconds": round(seconds[p], 3),
            "requests_per_s": round(done[p] / seconds[p], 2),
        }
        for p in PATHS
    }


def throughput(paths: Paths, s: Settings) -> dict[str, Any]:
    """Requests per second with N concurrent keep-alive clients, path by path in blocks."""
    return {
        "seconds_per_path": s.throughput_seconds,
        "blocks": s.throughput_blocks,
        "clients": {str(n): asyncio.run(_level(paths, n, s)) for n in s.throughput_clients},
    }


def history(paths: Paths, store_file: Path, s: Settings) -> dict[str, Any]:
    """Time outside the model: wall time minus llama-server's prompt + predict time, for
    requests without a session on each path and for hotmodel sessions of N stored messages;
    and hotmodel's own share of each (its ``Server-Timing`` header)."""
    asyncio.run(fill(store_file, s.history_sizes))
    names = (*PATHS, *(f"h{n}" for n in s.history_sizes))
    out: dict[str, list[float]] = {name: [] for name in names}
    own: dict[str, list[float]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        client = {
            n: stack.enter_context(c)
            for n, c in zip(names, clients(len(names), auth=paths.auth), strict=True)
        }
        for r in range(s.history_rounds + 1):
            for name in rotate(names, r):
                if name in PATHS:
                    url, body = paths.url(name), PLAIN
                else:
                    turn = {"role": "user", "content": f"turn {r}"}
                    url, body = paths.hotmodel, {**PLAIN, "messages": [turn], "session_id": name}
                outside, hotmodel_ms = timed_turn(client[name], url, body)
                if r:  # the first round warms connections and prompt caches
                    out[name].append(outside)
                    if hotmodel_ms is not None:
                        own[name].append(hotmodel_ms)
    return {
        "rounds": s.history_rounds,
        "no_session": {p: summary(out[p]) for p in PATHS},
        "stored_messages": {str(n): summary(out[f"h{n}"]) for n in s.history_sizes},
        "hotmodel_own": {
            "no_session": summary(own["hotmodel"]),
            **{str(n): summary(own[f"h{n}"]) for n in s.history_sizes},
        },
    }


def rss(paths: Paths, sampler: RssSampler, idle_start_mb: float, s: Settings) -> dict[str, Any]:
    """hotmodel's own resident memory: idle at start, idle after the run's load, and the
    peak under load (the whole run so far, and a burst of ``rss_clients`` clients)."""

    async def burst() -> None:
        group = [httpx.AsyncClient(timeout=120, trust_env=False) for _ in range(s.rss_clients)]
        try:
            await _block(group, paths.hotmodel, s.rss_seconds, Counter())
        finally:
            for c in group:
                await c.aclose()

    asyncio.run(burst())
    return {
        "idle_start_mb": idle_start_mb,
        "idle_after_load_mb": idle_rss_mb(sampler),
        "peak_under_load_mb": round(sampler.peak / MB, 1),
        "sampled_every_ms": round(sampler.every_s * 1000),
        "burst_clients": s.rss_clients,
    }
