#!/usr/bin/env python3
"""Measure the time a session turn spends outside the model, against stored history.

    .venv/bin/python scripts/bench_history.py [--rounds 10]

Starts `hotmodel serve` (SmolLM2), writes sessions of 0, 10, 1,000 and 10,000
stored messages straight into its store (SQLite WAL takes a second writer),
then sends turns on each: wall time minus llama-server's own prompt and
predict time (its `timings`) is hotmodel's share. Prints a Markdown table;
writes bench-results/history-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from bench_common import client as bench_client
from benchlib import ROOT, machine, serving

from hotmodel.sessions.store import SessionStore

SIZES = (0, 10, 1000, 10000)


async def fill(store_file: Path, sizes: tuple[int, ...] = SIZES) -> None:
    """Sessions ``h<n>`` of ``n`` stored messages each, written straight into the store."""
    async with SessionStore(store_file) as store:
        for n in sizes:
            if n:
                history = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
                    for i in range(n)
                ]
                await store.append("", f"h{n}", history, "smollm2", "")


def own_ms(server_timing: str | None) -> float | None:
    """hotmodel's own time from its ``Server-Timing`` header (``hotmodel;dur=MS, ...``)."""
    for part in (server_timing or "").split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name == "hotmodel" and duration:
            return float(duration)
    return None


def timed_turn(c: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, float | None]:
    """One chat request: its wall time minus llama-server's own prompt + predict time,
    and hotmodel's own time as its ``Server-Timing`` header says (None elsewhere)."""
    t0 = time.perf_counter()
    answer = c.post(url + "/v1/chat/completions", json=body)
    wall = (time.perf_counter() - t0) * 1000
    answer.raise_for_status()
    timings = answer.json()["timings"]
    outside = float(wall - timings["prompt_ms"] - timings["predicted_ms"])
    return outside, own_ms(answer.headers.get("server-timing"))


def outside_model_ms(c: httpx.Client, url: str, body: dict[str, Any]) -> float:
    """One chat request's wall time minus llama-server's own prompt + predict time."""
    return timed_turn(c, url, body)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    results: dict[int, list[float]] = {n: [] for n in SIZES}
    with serving() as served, bench_client(600) as c:
        asyncio.run(fill(served.config.parent / "state" / "sessions.sqlite3"))
        for r in range(args.rounds + 1):
            for n in SIZES:
                body = {
                    "messages": [{"role": "user", "content": f"turn {r}"}],
                    "max_tokens": 1,
                    "session_id": f"h{n}",
                }
                ms = outside_model_ms(c, served.base_url, body)
                if r:  # the first round warms the prompt cache
                    results[n].append(ms)
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "outside_model_ms_p50": {n: round(statistics.median(v), 1) for n, v in results.items()},
    }
    folder = ROOT / "bench-results"
    folder.mkdir(exist_ok=True)
    (folder / f"history-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=2)
    )
    print("| stored messages | time outside the model, p50 ms |")
    print("| --- | --- |")
    for n, ms in out["outside_model_ms_p50"].items():
        print(f"| {n} | {ms} |")


if __name__ == "__main__":
    main()
