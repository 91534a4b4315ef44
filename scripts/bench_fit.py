#!/usr/bin/env python3
"""Measure what llama-server's fitting pass (``--fit``, on by default) costs each load.

    .venv/bin/python scripts/bench_fit.py [--rounds 5]

Two bare llama-server routers with the arguments hotmodel would use, one with
the presets' ``fit = on`` and one with ``fit = off`` (the demo's), run side by
side; each round switches both between SmolLM2 and Gemma, alternating which
goes first, with the router's own unload + load (polled every 5 ms). Prints a
Markdown table of p50 load and unload times per model, and writes
bench-results/fit-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import client as bench_client
from bench_switch import bare_router, bare_switch
from benchlib import ROOT, demo_globals, machine, write_demo_config

SETTINGS = ("on", "off")


def measure(rounds: int) -> list[dict[str, Any]]:
    """``rounds`` round trips SmolLM2 -> Gemma -> SmolLM2 on each router, interleaved."""
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        urls = {}
        for fit in SETTINGS:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fit-")))
            config = write_demo_config(folder, shared={**demo_globals(), "fit": fit})
            urls[fit] = stack.enter_context(bare_router(config))
        c = stack.enter_context(bench_client(120))
        current = "smollm2"
        for i in range(rounds * 2):
            target = "gemma3" if current == "smollm2" else "smollm2"
            order = SETTINGS if i % 2 == 0 else SETTINGS[::-1]
            for fit in order:
                rows.append({"fit": fit, **bare_switch(c, urls[fit], current, target)})
            current = target
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    def p50(fit: str, model: str, key: str) -> float:
        values = [r[key] for r in rows if r["fit"] == fit and r["to"] == model]
        return round(float(statistics.median(values)), 1)

    lines = ["| model | load, fit on | load, fit off | saved per load |"]
    lines.append("| --- | --- | --- | --- |")
    for model in ("smollm2", "gemma3"):
        on, off = p50("on", model, "load_ms"), p50("off", model, "load_ms")
        lines.append(f"| {model} | {on} | {off} | {round(on - off, 1)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="round trips smollm2->gemma3->smollm2")
    args = ap.parse_args()
    rows = measure(args.rounds)
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "runs": rows}
    folder = ROOT / "bench-results"
    folder.mkdir(exist_ok=True)
    (folder / f"fit-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=2))
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
