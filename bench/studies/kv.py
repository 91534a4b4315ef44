"""Measure switching back to a model: KV snapshot restore against replay.

    .venv/bin/python -m bench kv [--items 290] [--rounds 3] [--pause 0] [--auto] [--out DIR]

For each mode (``kv``: [switch] kv_snapshots = true; ``replay``: false), start
`hotmodel serve` (SmolLM2 + Gemma; both at once) and build one session of about
2,600 tokens on SmolLM2 (one long user turn: --items facts); then --rounds times,
the modes in turn (each one first in every other round): switch to Gemma, and
measure from the start of the switch back to SmolLM2 to the first
token of the next turn (streamed): the switch itself (load included) plus the
turn's time to first token. Prints a Markdown table (the median round of each
mode); writes every round to bench-results/bench-kv-<timestamp>.json. The one
run's ``replay_kv`` section measures the same beside the bare router.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from bench import results
from bench.harness import ROOT, client, rotate, say, serving
from bench.sections.replay_kv import build_session, facts, kv_extra, switch_back

MODES = {"kv restore": True, "replay": False}


def _summary(mode: str, tokens: int, backs: list[dict[str, Any]]) -> dict[str, Any]:
    median = statistics.median_low(b["total_ms"] for b in backs)
    typical = next(b for b in backs if b["total_ms"] == median)
    return {
        "mode": mode,
        "session_tokens": tokens,
        **typical,  # the median round
        "rounds_total_ms": [b["total_ms"] for b in backs],
        "rounds": backs,
    }


def measure(items: int, rounds: int, pause: float, auto: bool) -> list[dict[str, Any]]:
    """Both modes served at once, their rounds interleaved (each mode first in turn), so
    that a slower stretch of a shared machine weighs on both alike."""
    with (
        serving(extra=kv_extra(True)) as kv,
        serving(extra=kv_extra(False)) as replaying,
        client(900) as c,
    ):
        base = {"kv restore": kv.base_url, "replay": replaying.base_url}
        tokens = {mode: build_session(c, base[mode], facts(items)) for mode in MODES}
        backs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for i in range(rounds):
            for mode in rotate(tuple(MODES), i):
                backs[mode].append(switch_back(c, base[mode], pause=pause, auto=auto))
    return [_summary(mode, tokens[mode], backs[mode]) for mode in MODES]


def markdown(runs: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in runs:
        restore = r["restore"] or {}
        took = f" ({restore.get('took')})" if restore else ""
        rows.append(
            [
                r["mode"],
                str(r["session_tokens"]),
                str(r["phases"].get("load")),
                f"{restore.get('ms', '-')}{took}",
                str((r["replay"] or {}).get("prompt_tokens", "-")),
                str(r["switch_back_ms"]),
                str(r["next_turn_first_token_ms"]),
                str(r["total_ms"]),
                ", ".join(str(t) for t in r["rounds_total_ms"]),
            ]
        )
    head = ["switch back by", "session tokens", "load ms", "restore ms (took)"]
    head += ["replay prompt_n", "switch back ms", "next turn first token ms", "total ms"]
    head += ["every round's total ms"]
    faster = runs[1]["total_ms"] / runs[0]["total_ms"]
    return [*results.table(head, rows), f"restore is {faster:.1f}x faster, load included"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench kv", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--items", type=int, default=290, help="facts in the session (~9 tokens each)")
    ap.add_argument("--rounds", type=int, default=3, help="switches back per mode (median shown)")
    ap.add_argument(
        "--pause", type=float, default=0.0, help="seconds on Gemma before switching back"
    )
    ap.add_argument(
        "--auto", action="store_true", help="the next turn itself switches back ([switch] auto)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args(argv)
    runs = measure(args.items, args.rounds, args.pause, args.auto)
    path = results.study(".venv/bin/python -m bench kv", args.out, "bench-kv", runs=runs)
    print("\n".join(markdown(runs)))
    say(f"results in {path}")
