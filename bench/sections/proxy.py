"""The ``proxy`` section: one request, three paths.

Plain 1-token requests and fixed-length streams (first byte, gaps between chunks)
on the loaded model's own process, the bare router and hotmodel, round-robin per
request so that drift of the machine hits all three alike.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import httpx

from bench.harness import (
    PATHS,
    PLAIN,
    RETRIES,
    Paths,
    Settings,
    clients,
    gaps,
    rotate,
    stream_body,
    summary,
)
from bench.results import cell, n, table, target


def plain_ms(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    """Wall milliseconds of one plain (non-streamed) chat request."""
    t0 = time.perf_counter()
    client.post(url + "/v1/chat/completions", json=body).raise_for_status()
    return (time.perf_counter() - t0) * 1000


def stream_times(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    """One streamed request: milliseconds to its first byte, and to each SSE event.

    Events that arrive in the same read share its arrival time.
    """
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        first: float | None = None
        events: list[float] = []
        for chunk in r.iter_raw():
            now = (time.perf_counter() - t0) * 1000
            first = now if first is None else first
            events += [now] * chunk.count(b"data: ")
    if first is None:
        raise RuntimeError(f"an empty stream from {url}")
    return first, events


def measure(paths: Paths, s: Settings) -> dict[str, Any]:
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
            p: RETRIES[paths.url(p)] for p in PATHS if RETRIES[paths.url(p)]
        },
    }


_FIGURES = (
    ("plain", "p50_ms", "plain p50 ms"),
    ("plain", "p99_ms", "plain p99 ms"),
    ("stream_first_byte", "p50_ms", "stream first byte p50 ms"),
    ("stream_first_byte", "p99_ms", "stream first byte p99 ms"),
    ("chunk_gap", "mean_ms", "gap between chunks, mean ms"),
    ("chunk_gap", "p99_ms", "gap between chunks, p99 ms"),
)
_SLACK = {  # (kind, stat): ms hotmodel may add over the router
    ("plain", "p50_ms"): 0.0,
    ("plain", "p99_ms"): 3.0,
    ("stream_first_byte", "p50_ms"): 1.0,
    ("chunk_gap", "mean_ms"): 1.0,
    ("chunk_gap", "p99_ms"): 1.0,
}


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    h, rt = r["paths"]["hotmodel"], r["paths"]["router"]
    out = []
    for kind, stat, label in _FIGURES:
        if (kind, stat) not in _SLACK:
            continue
        slack = _SLACK[kind, stat]
        hv, rv = float(h[kind][stat]), float(rt[kind][stat])
        bound = f"≤ router + {slack:g} ms" if slack else "≤ router"
        out.append(target(f"proxy: {label.removesuffix(' ms')}", hv, rv + slack, bound))
    return out


def markdown(r: dict[str, Any]) -> list[str]:
    p = r["paths"]
    checks = {t["figure"]: t for t in targets(r)}
    rows = []
    for kind, stat, label in _FIGURES:
        values = [float(p[path][kind][stat]) for path in PATHS]
        check = checks.get(f"proxy: {label.removesuffix(' ms')}")
        diff = f"{values[2] - values[1]:+.2f}"
        rows.append([label, *(n(v) for v in values), diff, cell(check) if check else "-"])
    intro = (
        f"{r['rounds']} rounds, each path in turn: a 1-token request, and a stream of "
        f"{r['stream_max_tokens']} tokens (`ignore_eos`); keep-alive client per path."
    )
    head = ["figure", "child", "router", "hotmodel", "hotmodel - router", "target"]
    return ["### Proxy: one request, three paths", "", intro, "", *table(head, rows)]
