#!/usr/bin/env python3
"""Measure switching back to a model: KV snapshot restore against replay.

    .venv/bin/python scripts/bench_kv.py [--items 290] [--rounds 3] [--pause 0]

For each mode (``kv``: [switch] kv_snapshots = true; ``replay``: false), start
`hotmodel serve` (SmolLM2 + Gemma; both at once) and build one session of about
2,600 tokens on SmolLM2 (one long user turn: --items facts); then --rounds times,
the modes in turn (each one first in every other round): switch to Gemma, and
measure from the start of the switch back to SmolLM2 to the first
token of the next turn (streamed): the switch itself (load included) plus the
turn's time to first token. Prints a Markdown table (the median round of each
mode); writes every round to bench-results/kv-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import httpx
from bench_common import client as bench_client
from bench_common import rotate
from benchlib import ROOT, machine, serving


def first_token(
    c: httpx.Client, base: str, text: str, session: str = "bench"
) -> tuple[float, dict[str, Any]]:
    """Milliseconds to the first content chunk of a streamed turn, and its final timings."""
    body = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "session_id": session,
    }
    return first_token_of(c, base, body)


def first_token_of(
    c: httpx.Client, base: str, body: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """Milliseconds to the first content chunk of streamed ``body``, and its final timings."""
    t0 = time.perf_counter()
    first = None
    timings: dict[str, Any] = {}
    with c.stream("POST", base + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            for choice in data.get("choices") or []:
                if first is None and (choice.get("delta") or {}).get("content"):
                    first = (time.perf_counter() - t0) * 1000
            timings = data.get("timings") or timings
    return round(first or 0.0, 1), timings


def facts(items: int) -> str:
    """One long user turn: ``items`` facts of about 9 tokens each."""
    return " ".join(f"item{i} is on shelf {i % 17}." for i in range(items))


QUESTION = "Which shelf is item7 on?"


def build_session(c: httpx.Client, base: str, text: str, session: str = "bench") -> int:
    """A session whose one user turn is ``text`` (1-token answer); its prompt tokens."""
    built = c.post(
        base + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 1,
            "temperature": 0,
            "session_id": session,
        },
    )
    built.raise_for_status()
    return int(built.json()["usage"]["prompt_tokens"])


def switch_back(
    c: httpx.Client, base: str, session: str = "bench", pause: float = 0.0, auto: bool = False
) -> dict[str, Any]:
    """Switch away to Gemma (not timed), wait ``pause`` seconds (the time spent with the
    other model), then time the switch back to SmolLM2 and the next turn's first token:
    ``POST /admin/switch``, then the turn; ``auto``: the turn itself, naming SmolLM2
    (``[switch] auto``: a chat UI's model picker), switches back."""
    away = c.post(base + "/admin/switch", json={"model": "gemma3"}).json()
    assert away["outcome"] == "ok", away
    time.sleep(pause)
    t0 = time.perf_counter()
    if auto:
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "session_id": session,
        }
        total, timings = first_token_of(c, base, body)
        ttft = switch_ms = None  # one request: its switch and its turn are not apart
    else:
        back = c.post(base + "/admin/switch", json={"model": "smollm2"}).json()
        switch_ms = round((time.perf_counter() - t0) * 1000, 1)
        assert back["outcome"] == "ok", back
        turn_started = time.perf_counter()
        ttft, timings = first_token(c, base, QUESTION, session)
        # to the first token: the switch back, then the turn's time to its first token
        total = (turn_started - t0) * 1000 + ttft
    # the turn's cache_n proved the restore (or not): the report in the history says so
    back = c.get(base + "/admin/switches").json()["data"][0]
    assert back["to"] == "smollm2" and back["outcome"] == "ok", back
    return {
        "saved": away["snapshot"].get("save"),
        "restore": back["snapshot"].get("restore"),
        "replay": back["replay"],
        "phases": back["phases"],
        "switch_back_ms": switch_ms,
        "next_turn_first_token_ms": ttft,
        "next_turn_timings": {k: timings.get(k) for k in ("prompt_n", "cache_n", "prompt_ms")},
        "total_ms": round(total, 1),
    }


def kv_extra(kv: bool) -> str:
    return f"[switch]\nkv_snapshots = {str(kv).lower()}\nreplay = true\nauto = true"


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


def _run(items: int, rounds: int, pause: float, auto: bool) -> list[dict[str, Any]]:
    """Both modes served at once, their rounds interleaved (each mode first in turn), so
    that a slower stretch of a shared machine weighs on both alike."""
    with (
        serving(extra=kv_extra(True)) as kv,
        serving(extra=kv_extra(False)) as replay,
        bench_client(900) as c,
    ):
        base = {"kv restore": kv.base_url, "replay": replay.base_url}
        tokens = {mode: build_session(c, base[mode], facts(items)) for mode in MODES}
        backs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for i in range(rounds):
            for mode in rotate(tuple(MODES), i):
                backs[mode].append(switch_back(c, base[mode], pause=pause, auto=auto))
    return [_summary(mode, tokens[mode], backs[mode]) for mode in MODES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=290, help="facts in the session (~9 tokens each)")
    ap.add_argument("--rounds", type=int, default=3, help="switches back per mode (median shown)")
    ap.add_argument(
        "--pause", type=float, default=0.0, help="seconds on Gemma before switching back"
    )
    ap.add_argument(
        "--auto", action="store_true", help="the next turn itself switches back ([switch] auto)"
    )
    args = ap.parse_args()
    runs = _run(args.items, args.rounds, args.pause, args.auto)
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "runs": runs}
    folder = ROOT / "bench-results"
    folder.mkdir(exist_ok=True)
    (folder / f"kv-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=2))
    print(
        "| switch back by | session tokens | load ms | restore ms (took) | replay prompt_n | "
        "switch back ms | next turn first token ms | total ms | every round's total ms |"
    )
    print("|" + " --- |" * 9)
    for r in runs:
        restore = r["restore"] or {}
        took = f" ({restore.get('took')})" if restore else ""
        print(
            f"| {r['mode']} | {r['session_tokens']} | {r['phases'].get('load')} | "
            f"{restore.get('ms', '-')}{took} | {(r['replay'] or {}).get('prompt_tokens', '-')} | "
            f"{r['switch_back_ms']} | {r['next_turn_first_token_ms']} | {r['total_ms']} | "
            f"{', '.join(str(t) for t in r['rounds_total_ms'])} |"
        )
    print(f"restore is {runs[1]['total_ms'] / runs[0]['total_ms']:.1f}x faster, load included")


if __name__ == "__main__":
    main()
