"""The ``throughput`` section: requests per second with N concurrent keep-alive
clients on each of the three paths, path by path in interleaved blocks."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx

from bench.harness import PATHS, PLAIN, Paths, Settings, rotate
from bench.results import cell, n, table, target


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


async def block(
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


async def _level(paths: Paths, clients: int, s: Settings) -> dict[str, Any]:
    group = {
        p: [
            httpx.AsyncClient(timeout=120, trust_env=False, headers=paths.auth)
            for _ in range(clients)
        ]
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
                got, took = await block(group[p], paths.url(p), block_s, errors[p])
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


def measure(paths: Paths, s: Settings) -> dict[str, Any]:
    """Requests per second with N concurrent keep-alive clients, path by path in blocks."""
    return {
        "seconds_per_path": s.throughput_seconds,
        "blocks": s.throughput_blocks,
        "clients": {str(c): asyncio.run(_level(paths, c, s)) for c in s.throughput_clients},
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for clients, paths in r["clients"].items():
        ratio = paths["hotmodel"]["requests_per_s"] / max(1e-9, paths["router"]["requests_per_s"])
        figure = f"throughput: {clients} clients, x router"
        out.append(target(figure, ratio, 0.97, "≥ 0.97 x router", "x", True))
    return out


def markdown(r: dict[str, Any]) -> list[str]:
    rows = []
    for (clients, paths), check in zip(r["clients"].items(), targets(r), strict=True):
        rps = [paths[p]["requests_per_s"] for p in PATHS]
        errors = "/".join(str(paths[p]["errors"]) for p in PATHS)
        rows.append([clients, *(n(v, 1) for v in rps), f"{check['measured']:.3f}", errors])
        rows[-1].append(cell(check))
    intro = (
        f"N keep-alive clients sending 1-token requests back to back, {r['seconds_per_path']:g} s "
        f"per path in {r['blocks']} interleaved blocks; requests per second."
    )
    head = ["clients", "child", "router", "hotmodel", "hotmodel / router"]
    head += ["failed (child/router/hotmodel)", "target"]
    return ["### Throughput", "", intro, "", *table(head, rows)]
