#!/usr/bin/env python3
"""Measure a switch: hotmodel's zero_overlap switch against the router's bare unload + load.

    .venv/bin/python scripts/bench_switch.py [--rounds 5]

1. Baseline: a bare llama-server router (same arguments hotmodel would use),
   driven directly: POST /models/unload, poll GET /models every 5 ms until
   `unloaded`, POST /models/load, poll until `loaded`. SmolLM2 <-> Gemma.
2. hotmodel: `hotmodel serve` on the same models, `POST /admin/switch` in
   both directions; the report's phases, and the first 1-token chat request
   after each switch.

Prints a Markdown table and writes bench-results/switch-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from bench_common import client as bench_client
from benchlib import ROOT, machine, serving, wait_healthy, write_demo_config

from hotmodel.config import load_config
from hotmodel.router import provision
from hotmodel.router.supervisor import free_port, router_argv


def wait_status(client: httpx.Client, url: str, model: str, want: str) -> None:
    """Poll the router's GET /models every 5 ms until ``model`` reads ``want``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for m in client.get(url + "/models").json()["data"]:
            if m["id"] == model and m["status"]["value"] == want:
                return
        time.sleep(0.005)
    raise TimeoutError(f"{model} never reached {want}")


@contextlib.contextmanager
def bare_router(config_path: Path, model: str = "smollm2") -> Iterator[str]:
    """A llama-server router with the arguments hotmodel would use, not managed by
    hotmodel, with ``model`` loaded; yields its URL and stops it after."""
    config = load_config(config_path)
    port = free_port("127.0.0.1")
    state = config.server.state_dir
    state.mkdir(parents=True, exist_ok=True)
    presets = state / "bench-presets.ini"
    presets.write_text(config.presets.render())
    argv = router_argv(config, provision.find_llama_server(), presets, port)
    url = f"http://127.0.0.1:{port}"
    with (state / "bench-router.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, "the bare router")
        with bench_client(30) as c:
            c.post(url + "/models/load", json={"model": model})
            wait_status(c, url, model, "loaded")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def bare_switch(c: httpx.Client, url: str, current: str, target: str) -> dict[str, Any]:
    """The router's own unload of ``current`` + load of ``target``, timed."""
    t0 = time.perf_counter()
    c.post(url + "/models/unload", json={"model": current})
    wait_status(c, url, current, "unloaded")
    t1 = time.perf_counter()
    c.post(url + "/models/load", json={"model": target})
    wait_status(c, url, target, "loaded")
    t2 = time.perf_counter()
    return {
        "to": target,
        "unload_ms": (t1 - t0) * 1000,
        "load_ms": (t2 - t1) * 1000,
        "total_ms": (t2 - t0) * 1000,
    }


def hotmodel_switch(c: httpx.Client, base: str, target: str) -> dict[str, Any]:
    """``POST /admin/switch`` to ``target``, timed by the client; the report's phases."""
    t0 = time.perf_counter()
    report = c.post(base + "/admin/switch", json={"model": target}).json()
    t1 = time.perf_counter()
    assert report["outcome"] == "ok", report
    return {
        "to": target,
        "client_ms": (t1 - t0) * 1000,
        "report_total_ms": report["total_ms"],
        "phases": report["phases"],
    }


def _baseline(config_path: Path, rounds: int) -> list[dict[str, Any]]:
    out = []
    with bare_router(config_path) as url, bench_client(30) as c:
        current = "smollm2"
        for _ in range(rounds * 2):
            target = "gemma3" if current == "smollm2" else "smollm2"
            out.append(bare_switch(c, url, current, target))
            current = target
    return out


def _hotmodel(rounds: int) -> list[dict[str, Any]]:
    out = []
    with serving() as served, bench_client(120) as c:
        base = served.base_url
        current = "smollm2"
        for _ in range(rounds * 2):
            target = "gemma3" if current == "smollm2" else "smollm2"
            row = hotmodel_switch(c, base, target)
            t1 = time.perf_counter()
            first = c.post(
                base + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
            )
            t2 = time.perf_counter()
            first.raise_for_status()
            out.append({**row, "first_chat_ms": (t2 - t1) * 1000})
            current = target
    return out


def _p50(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="round trips smollm2->gemma3->smollm2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hotmodel-bench-") as tmp:
        base = _baseline(write_demo_config(Path(tmp)), args.rounds)
    hot = _hotmodel(args.rounds)

    rows = []
    for target in ("gemma3", "smollm2"):
        b = [r for r in base if r["to"] == target]
        h = [r for r in hot if r["to"] == target]
        rows.append(
            {
                "to": target,
                "bare_unload_ms": _p50([r["unload_ms"] for r in b]),
                "bare_load_ms": _p50([r["load_ms"] for r in b]),
                "bare_total_ms": _p50([r["total_ms"] for r in b]),
                "hotmodel_unload_ms": _p50([r["phases"]["unload"] for r in h]),
                "hotmodel_load_ms": _p50([r["phases"]["load"] for r in h]),
                "hotmodel_switch_ms": _p50([r["report_total_ms"] for r in h]),
                "hotmodel_client_ms": _p50([r["client_ms"] for r in h]),
                "first_chat_after_ms": _p50([r["first_chat_ms"] for r in h]),
            }
        )
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "rounds": args.rounds,
        "summary_p50": rows,
        "bare": base,
        "hotmodel": hot,
    }
    folder = ROOT / "bench-results"
    folder.mkdir(exist_ok=True)
    (folder / f"switch-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(result, indent=2)
    )
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
