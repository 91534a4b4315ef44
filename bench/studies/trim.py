"""Measure prompt-cache reuse over a long conversation held at its bound, by trim_low_water.

    .venv/bin/python -m bench trim [--turns 60] [--max-messages 16] [--out DIR]

One session on SmolLM2, --turns turns, with [session] max_session_messages =
--max-messages, once trimming to the earliest fit on every turn (trim_low_water
= 1.0, the old behaviour) and once cutting back to a low-water mark (0.75).
Reports the share of prompt tokens llama-server took from its cache
(sum of cache_n over sum of cache_n + prompt_n) and the mean prompt time, over
the turns past the bound. Writes bench-results/bench-trim-<timestamp>.json. The
one run's ``cache`` section measures the default low-water mark.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from bench import results
from bench.harness import ROOT, client, say, serving
from bench.sections.cache import past_bound, trim_extra, turn_timings


def _run(low_water: float, turns: int, max_messages: int) -> dict[str, Any]:
    cached = evaluated = 0
    prompt_ms: list[float] = []
    with (
        serving(extra=trim_extra(max_messages, low_water)) as served,
        client(600) as c,
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


def markdown(runs: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            str(r["trim_low_water"]),
            str(r["turns_past_bound"]),
            f"{r['cache_share']:.0%} ({r['cached_tokens']} of "
            f"{r['cached_tokens'] + r['evaluated_tokens']})",
            str(r["mean_prompt_ms"]),
        ]
        for r in runs
    ]
    head = ["trim_low_water", "turns past the bound", "prompt tokens from cache"]
    return results.table([*head, "mean prompt ms"], rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench trim", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--turns", type=int, default=60)
    ap.add_argument("--max-messages", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args(argv)
    runs = [_run(w, args.turns, args.max_messages) for w in (1.0, 0.75)]
    path = results.study(".venv/bin/python -m bench trim", args.out, "bench-trim", runs=runs)
    print("\n".join(markdown(runs)))
    say(f"results in {path}")
