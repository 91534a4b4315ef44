"""Measure what llama-server's fitting pass (``--fit``, on by default) costs each load.

    .venv/bin/python -m bench fit [--rounds 5] [--out DIR]

Two bare llama-server routers with the arguments hotmodel would use, one with
the presets' ``fit = on`` and one with ``fit = off`` (the demo's), run side by
side; each round switches both between SmolLM2 and Gemma, alternating which
goes first, with the router's own unload + load (polled every 5 ms). Prints a
Markdown table of p50 load times per model, and writes
bench-results/bench-fit-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from bench import results
from bench.harness import (
    OTHER,
    ROOT,
    bare_router,
    bare_switch,
    client,
    demo_globals,
    p50,
    say,
    write_demo_config,
)

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
        c = stack.enter_context(client(120))
        current = "smollm2"
        for i in range(rounds * 2):
            target = OTHER[current]
            order = SETTINGS if i % 2 == 0 else SETTINGS[::-1]
            for fit in order:
                rows.append({"fit": fit, **bare_switch(c, urls[fit], current, target)})
            current = target
    return rows


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    def load(fit: str, model: str) -> float:
        return p50([float(r["load_ms"]) for r in rows if r["fit"] == fit and r["to"] == model])

    lines = []
    for model in ("smollm2", "gemma3"):
        on, off = load("on", model), load("off", model)
        lines.append([model, str(on), str(off), str(round(on - off, 1))])
    return results.table(["model", "load, fit on", "load, fit off", "saved per load"], lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench fit", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--rounds", type=int, default=5, help="round trips smollm2->gemma3->smollm2")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args(argv)
    rows = measure(args.rounds)
    path = results.study(".venv/bin/python -m bench fit", args.out, "bench-fit", runs=rows)
    print("\n".join(markdown(rows)))
    say(f"results in {path}")
