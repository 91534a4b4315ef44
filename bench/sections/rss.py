"""The ``rss`` section: hotmodel's own resident memory (not its llama-server
processes'), idle at start, idle after the run's load, and its peak under load."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx

from bench.harness import MB, Paths, RssSampler, Settings, idle_rss_mb
from bench.results import cell, n, table, target
from bench.sections.throughput import block

RSS_LIMIT_MB = 80.0


def measure(paths: Paths, sampler: RssSampler, idle_start_mb: float, s: Settings) -> dict[str, Any]:
    """Idle at start (``idle_start_mb``), idle after the run's load, and the peak under
    load (the whole run so far on this `hotmodel serve`, and a burst of ``rss_clients``)."""

    async def burst() -> None:
        group = [httpx.AsyncClient(timeout=120, trust_env=False) for _ in range(s.rss_clients)]
        try:
            await block(group, paths.hotmodel, s.rss_seconds, Counter())
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


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        target("rss: idle", r["idle_after_load_mb"], RSS_LIMIT_MB, "≤ 80 MB", "MB"),
        target("rss: under load, peak", r["peak_under_load_mb"], RSS_LIMIT_MB, "≤ 80 MB", "MB"),
    ]


def markdown(r: dict[str, Any]) -> list[str]:
    idle, peak = targets(r)
    rows = [
        ["idle, after start", n(r["idle_start_mb"], 1), "-"],
        ["idle, after the load", n(r["idle_after_load_mb"], 1), cell(idle)],
        ["under load, peak", n(r["peak_under_load_mb"], 1), cell(peak)],
    ]
    intro = (
        "hotmodel's own process (not the llama-server processes). The peak: sampled every "
        f"{r['sampled_every_ms']} ms through every section run on the same `hotmodel serve` "
        f"(throughput included, when run) and a last burst of {r['burst_clients']} clients."
    )
    return [
        "### hotmodel's memory (RSS), MB",
        "",
        intro,
        "",
        *table(["figure", "MB", "target"], rows),
    ]
