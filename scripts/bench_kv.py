#!/usr/bin/env python3
"""Measure switching back to a model: KV snapshot restore against replay.

    .venv/bin/python scripts/bench_kv.py [--items 290]

For each mode (``kv``: [switch] kv_snapshots = true; ``replay``: false), start
`hotmodel serve` (SmolLM2 + Gemma), build one session of about 2,600 tokens on
SmolLM2 (one long user turn: --items facts), switch to Gemma, then measure from
the start of the switch back to SmolLM2 to the first token of the next turn
(streamed): the switch itself (load included) plus the turn's time to first
token. Prints a Markdown table; writes bench-results/kv-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx
from benchlib import ROOT, machine, serving


def _first_token(c: httpx.Client, base: str, text: str) -> tuple[float, dict[str, Any]]:
    """Milliseconds to the first content chunk of a streamed turn, and its final timings."""
    body = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "session_id": "bench",
    }
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


def _run(kv: bool, items: int) -> dict[str, Any]:
    facts = " ".join(f"item{i} is on shelf {i % 17}." for i in range(items))
    extra = f"[switch]\nkv_snapshots = {str(kv).lower()}\nreplay = true"
    with serving(extra=extra) as served, httpx.Client(timeout=900, trust_env=False) as c:
        base = served.base_url
        built = c.post(
            base + "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": facts}],
                "max_tokens": 1,
                "temperature": 0,
                "session_id": "bench",
            },
        )
        built.raise_for_status()
        away = c.post(base + "/admin/switch", json={"model": "gemma3"}).json()
        assert away["outcome"] == "ok", away
        t0 = time.perf_counter()
        back = c.post(base + "/admin/switch", json={"model": "smollm2"}).json()
        switch_ms = (time.perf_counter() - t0) * 1000
        assert back["outcome"] == "ok", back
        turn_started = time.perf_counter()
        ttft, timings = _first_token(c, base, "Which shelf is item7 on?")
        # to the first token: the switch back, then the turn's time to its first token
        total = (turn_started - t0) * 1000 + ttft
    return {
        "mode": "kv restore" if kv else "replay",
        "session_tokens": built.json()["usage"]["prompt_tokens"],
        "saved": away["snapshot"].get("save"),
        "restore": back["snapshot"].get("restore"),
        "replay": back["replay"],
        "phases": back["phases"],
        "switch_back_ms": round(switch_ms, 1),
        "next_turn_first_token_ms": ttft,
        "next_turn_timings": {k: timings.get(k) for k in ("prompt_n", "cache_n", "prompt_ms")},
        "total_ms": round(total, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=290, help="facts in the session (~9 tokens each)")
    args = ap.parse_args()
    runs = [_run(True, args.items), _run(False, args.items)]
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "runs": runs}
    folder = ROOT / "bench-results"
    folder.mkdir(exist_ok=True)
    (folder / f"kv-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=2))
    print(
        "| switch back by | session tokens | load ms | restore ms | replay prompt_n | "
        "switch back ms | next turn first token ms | total ms |"
    )
    print("|" + " --- |" * 8)
    for r in runs:
        restore = r["restore"] or {}
        print(
            f"| {r['mode']} | {r['session_tokens']} | {r['phases'].get('load')} | "
            f"{restore.get('ms', '-')} | {(r['replay'] or {}).get('prompt_tokens')} | "
            f"{r['switch_back_ms']} | {r['next_turn_first_token_ms']} | {r['total_ms']} |"
        )
    print(f"restore is {runs[1]['total_ms'] / runs[0]['total_ms']:.1f}x faster, load included")


if __name__ == "__main__":
    main()
