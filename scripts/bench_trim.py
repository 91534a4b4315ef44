#!/usr/bin/env python3
"""Measure prompt-cache reuse over a long conversation held at its bound.

    .venv/bin/python scripts/bench_trim.py [--turns 60] [--max-messages 16]

One session on SmolLM2, --turns turns, with [session] max_session_messages =
--max-messages, once trimming to the earliest fit on every turn (trim_low_water
= 1.0, the old behaviour) and once cutting back to a low-water mark (0.75).
Reports the share of prompt tokens llama-server took from its cache
(sum of cache_n over sum of cache_n + prompt_n) and the mean prompt time, over
the turns past the bound. Writes bench-results/trim-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import httpx
from bench_common import client as bench_client
from benchlib import ROOT, machine, serving


def turn_timings(c: httpx.Client, base: str, i: int, session: str = "long") -> dict[str, Any]:
    """Turn ``i`` of the long conversation; llama-server's timings of it."""
    answer = c.post(
        base + "/v1/chat/completions",
        json={
            "messages": [
                {"role": "user", "content": f"Tell me one short fact about the number {i}."}
            ],
            "max_tokens": 12,
            "temperature": 0,
            "session_id": session,
        },
    )
    answer.raise_for_status()
    timings: dict[str, Any] = answer.json()["timings"]
    return timings


def trim_extra(max_messages: int, low_water: float | None = None) -> str:
    extra = f"[session]\nmax_session_messages = {max_messages}\n"
    return extra + (f"trim_low_water = {low_water}\n" if low_water is not None else "")


def past_bound(i: int, max_messages: int) -> bool:
    """Turn ``i`` (from 0) is sent past the bound: trimming is at work."""
    return 2 * (i + 1) > max_messages


def _run(low_water: float, turns: int, max_messages: int) -> dict[str, Any]:
    cached = evaluated = 0
    prompt_ms: list[float] = []
    with (
        serving(extra=trim_extra(max_messages, low_water)) as served,
        bench_client(600) as c,
    ):
        for i in range(turns):
            timings = turn_timings(c, served.base_url, i)
            if past_bound(i, max_messages):
                cached += timings["cache_n"]
                evaluated += timings["prompt_n"]
                prompt_ms.append(timings["prompt_ms"])
    return {
        "trim_low_water": low_water,
        "turns_past_bound": len(prompt_ms),
        "cache_share": round(cached / max(1, cached + evaluated), 3),
        "mean_prompt_ms": round(statistics.fmean(prompt_ms), 1) if prompt_ms else None,
        "cached_tokens": cached,
        "evaluated_tokens": evaluated,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=60)
    ap.add_argument("--max-messages", type=int, default=16)
    args = ap.parse_args()
    runs = [_run(w, args.turns, args.max_messages) for w in (1.0, 0.75)]
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "runs": runs}
    folder = ROOT / "bench-results"
    folder.mkdir(exist_ok=True)
    (folder / f"trim-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=2))
    print("| trim_low_water | turns past the bound | prompt tokens from cache | mean prompt ms |")
    print("| --- | --- | --- | --- |")
    for r in runs:
        print(
            f"| {r['trim_low_water']} | {r['turns_past_bound']} | "
            f"{r['cache_share']:.0%} ({r['cached_tokens']} of "
            f"{r['cached_tokens'] + r['evaluated_tokens']}) | {r['mean_prompt_ms']} |"
        )


if __name__ == "__main__":
    main()
