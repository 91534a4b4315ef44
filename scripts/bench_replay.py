#!/usr/bin/env python3
"""Measure replay: the first turn after a switch, with and without prefilling the session.

    .venv/bin/python scripts/bench_replay.py [--turns 8]

For replay on and off: start `hotmodel serve` (SmolLM2 + Gemma), build one
session of --turns exchanges on SmolLM2, switch to Gemma (the switch report
gives the replay's prompt tokens and milliseconds), then send the next turn
and record its timings (prompt_n, cache_n, prompt_ms) and wall time.
Prints a Markdown table; writes bench-results/replay-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench_common import client as bench_client
from benchlib import ROOT, machine, serving

TURN = (
    "Here is part {i} of my travel notes: we walked along the river, visited the old "
    "market, tried the local bread and cheese, and talked with a fisherman about the "
    "weather, the boats, the tides and the price of fish this season."
)


def _run(replay: bool, turns: int) -> dict[str, Any]:
    with (
        serving(extra=f"[switch]\nreplay = {str(replay).lower()}") as served,
        bench_client(600) as c,
    ):
        base = served.base_url
        headers = {"x-session-id": "bench"}
        for i in range(turns):
            c.post(
                base + "/v1/chat/completions",
                headers=headers,
                json={
                    "messages": [{"role": "user", "content": TURN.format(i=i)}],
                    "max_tokens": 16,
                    "temperature": 0,
                },
            ).raise_for_status()
        report = c.post(base + "/admin/switch", json={"model": "gemma3"}).json()
        assert report["outcome"] == "ok", report
        t0 = time.perf_counter()
        first = c.post(
            base + "/v1/chat/completions",
            headers=headers,
            json={
                "messages": [{"role": "user", "content": "Summarize my notes."}],
                "max_tokens": 1,
                "temperature": 0,
            },
        )
        wall = (time.perf_counter() - t0) * 1000
        first.raise_for_status()
    timings = first.json()["timings"]
    return {
        "replay": replay,
        "switch_total_ms": report["total_ms"],
        "switch_replay": report["replay"],
        "switch_phases": report["phases"],
        "first_turn": {
            "prompt_tokens": first.json()["usage"]["prompt_tokens"],
            "prompt_n": timings["prompt_n"],
            "cache_n": timings["cache_n"],
            "prompt_ms": timings["prompt_ms"],
            "wall_ms": round(wall, 1),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=8)
    args = ap.parse_args()
    runs = [_run(True, args.turns), _run(False, args.turns)]
    out = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "turns": args.turns,
        "machine": machine(),
        "runs": runs,
    }
    folder = ROOT / "bench-results"
    folder.mkdir(exist_ok=True)
    (folder / f"replay-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=2))
    print(
        "| replay | switch ms | replay prompt tokens | replay ms | first turn prompt tokens |"
        " prompt_n | cache_n | prompt_ms | first turn wall ms |"
    )
    print("|" + " --- |" * 9)
    for r in runs:
        rp = r["switch_replay"] or {}
        f = r["first_turn"]
        print(
            f"| {'on' if r['replay'] else 'off'} | {r['switch_total_ms']} | "
            f"{rp.get('prompt_tokens', '-')} | {rp.get('prompt_ms', '-')} | "
            f"{f['prompt_tokens']} | {f['prompt_n']} | {f['cache_n']} | "
            f"{round(f['prompt_ms'], 1)} | {f['wall_ms']} |"
        )


if __name__ == "__main__":
    main()
