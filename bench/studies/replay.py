"""Measure replay: the first turn after a switch, with and without prefilling the session.

    .venv/bin/python -m bench replay [--turns 8] [--out DIR]

For replay on and off: start `hotmodel serve` (SmolLM2 + Gemma), build one
session of --turns exchanges on SmolLM2, switch to Gemma (the switch report
gives the replay's prompt tokens and milliseconds), then send the next turn
and record its timings (prompt_n, cache_n, prompt_ms) and wall time.
Prints a Markdown table; writes bench-results/bench-replay-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench import results
from bench.harness import ROOT, client, say, serving

TURN = (
    "Here is part {i} of my travel notes: we walked along the river, visited the old "
    "market, tried the local bread and cheese, and talked with a fisherman about the "
    "weather, the boats, the tides and the price of fish this season."
)


def _run(replay_session: bool, turns: int) -> dict[str, Any]:
    with (
        serving(extra=f"[switch]\nreplay_session = {str(replay_session).lower()}") as served,
        client(600) as c,
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
        "replay": replay_session,
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


def markdown(runs: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in runs:
        rp = r["switch_replay"] or {}
        f = r["first_turn"]
        rows.append(
            [
                "on" if r["replay"] else "off",
                str(r["switch_total_ms"]),
                str(rp.get("prompt_tokens", "-")),
                str(rp.get("prompt_ms", "-")),
                str(f["prompt_tokens"]),
                str(f["prompt_n"]),
                str(f["cache_n"]),
                str(round(f["prompt_ms"], 1)),
                str(f["wall_ms"]),
            ]
        )
    head = ["replay", "switch ms", "replay prompt tokens", "replay ms", "first turn prompt tokens"]
    head += ["prompt_n", "cache_n", "prompt_ms", "first turn wall ms"]
    return results.table(head, rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench replay", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args(argv)
    runs = [_run(True, args.turns), _run(False, args.turns)]
    command = ".venv/bin/python -m bench replay"
    path = results.study(command, args.out, "bench-replay", turns=args.turns, runs=runs)
    print("\n".join(markdown(runs)))
    say(f"results in {path}")
