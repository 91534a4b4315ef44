"""The ``throughput`` section: requests per second with N concurrent keep-alive
clients on each of the three paths, path by path in interleaved blocks; and with
clients that open a fresh connection per request (what many HTTP libraries do by
default), in bursts of a fixed number of requests, interleaved path by path."""

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


async def _burst(
    client: httpx.AsyncClient, url: str, workers: int, requests: int, errors: Counter[str]
) -> float:
    """``workers`` concurrent clients share ``requests`` requests, each on a connection of
    its own; the seconds until the last one was answered."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                answer = await client.post(url + "/v1/chat/completions", json=PLAIN)
            except httpx.TransportError as exc:
                errors[type(exc).__name__] += 1
                continue
            if answer.status_code != 200:
                errors[f"HTTP {answer.status_code}"] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - t0


async def _bursts(paths: Paths, s: Settings) -> dict[str, Any]:
    # no kept-alive connection: every request opens (and closes) its own
    fresh = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    group = {
        p: httpx.AsyncClient(timeout=120, trust_env=False, headers=paths.auth, limits=fresh)
        for p in PATHS
    }
    seconds = dict.fromkeys(PATHS, 0.0)
    errors: dict[str, Counter[str]] = {p: Counter() for p in PATHS}
    try:
        for b in range(s.burst_rounds):
            for p in rotate(PATHS, b):
                took = await _burst(
                    group[p], paths.url(p), s.burst_clients, s.burst_requests, errors[p]
                )
                seconds[p] += took
    finally:
        for c in group.values():
            await c.aclose()
    sent = s.burst_requests * s.burst_rounds
    return {
        p: {
            "requests": sent - sum(errors[p].values()),
            "errors": sum(errors[p].values()),
            "error_kinds": dict(errors[p]),
            "seconds": round(seconds[p], 3),
            "requests_per_s": round((sent - sum(errors[p].values())) / seconds[p], 2),
        }
        for p in PATHS
    }


def measure(paths: Paths, s: Settings) -> dict[str, Any]:
    """Requests per second with N concurrent keep-alive clients, path by path in blocks;
    then with fresh connections, in bursts."""
    return {
        "seconds_per_path": s.throughput_seconds,
        "blocks": s.throughput_blocks,
        "clients": {str(c): asyncio.run(_level(paths, c, s)) for c in s.throughput_clients},
        "fresh": {
            "clients": s.burst_clients,
            "requests_per_burst": s.burst_requests,
            "bursts_per_path": s.burst_rounds,
            "paths": asyncio.run(_bursts(paths, s)),
        },
    }


def _levels(r: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each measured level: (its label, its paths), the fresh connections' last."""
    out = list(r["clients"].items())
    fresh = r.get("fresh")
    if fresh is not None:
        out.append((f"{fresh['clients']} fresh", fresh["paths"]))
    return out


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for clients, paths in _levels(r):
        ratio = paths["hotmodel"]["requests_per_s"] / max(1e-9, paths["router"]["requests_per_s"])
        label = clients.replace(" fresh", " clients, a fresh connection each")
        figure = f"throughput: {label if 'fresh' in clients else clients + ' clients'}, x router"
        out.append(target(figure, ratio, 0.97, "≥ 0.97 x router", "x", True))
    return out


def markdown(r: dict[str, Any]) -> list[str]:
    rows = []
    for (clients, paths), check in zip(_levels(r), targets(r), strict=True):
        rps = [paths[p]["requests_per_s"] for p in PATHS]
        errors = "/".join(str(paths[p]["errors"]) for p in PATHS)
        rows.append([clients, *(n(v, 1) for v in rps), f"{check['measured']:.3f}", errors])
        rows[-1].append(cell(check))
    intro = (
        f"N keep-alive clients sending 1-token requests back to back, {r['seconds_per_path']:g} s "
        f"per path in {r['blocks']} interleaved blocks; requests per second."
    )
    fresh = r.get("fresh")
    if fresh is not None:
        intro += (
            f' "{fresh["clients"]} fresh": {fresh["clients"]} clients opening a new connection '
            f"for each request, {fresh['requests_per_burst']} requests per burst, "
            f"{fresh['bursts_per_path']} bursts per path, interleaved."
        )
    head = ["clients", "child", "router", "hotmodel", "hotmodel / router"]
    head += ["failed (child/router/hotmodel)", "target"]
    return ["### Throughput", "", intro, "", *table(head, rows)]
