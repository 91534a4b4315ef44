"""GPU memory around switches: what each phase costs and what the GPU holds after it.

    .venv/bin/python -m bench gpu [--rounds N] [--out DIR]

Needs a GPU and a llama-server built with CUDA (or another GPU backend) where
`hotmodel setup` caches it, or on PATH. Starts `hotmodel serve` on the two demo
models twice: with `[switch] policy = "zero_overlap"` and with `"auto"` (two
models may be loaded; overlap is chosen when the free memory covers the target).
Each run builds a short conversation, then switches SmolLM2 -> Gemma -> SmolLM2
``--rounds`` times. Every switch report gives its phases (drain, unload, settle,
load, replay, ...) and the four GPU readings (before the unload, after it, once
settled, after the load); this prints them as a table and writes them as JSON.
No GPU: the snapshots are empty and the table says so.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from bench import results
from bench.harness import ROOT, client, llama_cpp, say, serving
from hotmodel.control.gpu import detect_probe

POLICIES = {
    "zero_overlap": '[switch]\npolicy = "zero_overlap"\nreplay_session = true\n',
    "auto": 'models_max = 2\n[switch]\npolicy = "auto"\nreplay_session = true\n',
}
PHASES = ("drain", "unload", "settle", "load", "replay")
SNAPS = ("before_unload", "after_unload", "after_settle", "after_load")


def _gpu_used(report: dict[str, Any]) -> dict[str, int | None]:
    gpu = report.get("gpu") or {}
    return {name: (gpu.get(name) or {}).get("used_mib") for name in SNAPS}


def _used_now() -> int | None:
    snap = detect_probe().read()
    return None if snap is None else snap.used_mib


def run_policy(policy: str, rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with serving(extra=POLICIES[policy]) as served, client(300) as c:
        base = served.base_url
        chat = {
            "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 8,
            "temperature": 0,
            "session_id": "gpu-bench",
        }
        c.post(base + "/v1/chat/completions", json=chat).raise_for_status()
        rows.append({"policy": policy, "smollm2_loaded_mib": _used_now()})
        for _ in range(rounds):
            for target in ("gemma3", "smollm2"):
                report = c.post(base + "/admin/switch", json={"model": target}).json()
                rows.append(
                    {
                        "policy": policy,
                        "chosen": report.get("policy"),
                        "reason": report.get("policy_reason"),
                        "from": report.get("from"),
                        "to": report.get("to"),
                        "outcome": report.get("outcome"),
                        "total_ms": report.get("total_ms"),
                        "phases": report.get("phases"),
                        "gpu_used_mib": _gpu_used(report),
                        "report": report,
                    }
                )
    return rows


def _cell(value: float | int | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    """p50 per policy and direction: phases in ms, GPU memory in MiB."""
    head = ["policy (chosen)", "switch", "total ms", *(f"{p} ms" for p in PHASES)]
    head += [f"{s} MiB" for s in SNAPS]
    lines: list[list[str]] = []
    switches = [r for r in rows if "to" in r]
    order = list(POLICIES)
    keys = sorted(
        {(r["policy"], r["from"], r["to"]) for r in switches},
        key=lambda k: (order.index(k[0]), k[1], k[2]),
    )
    for policy, src, dst in keys:
        group = [r for r in switches if (r["policy"], r["from"], r["to"]) == (policy, src, dst)]

        def p50(values: list[float | int | None]) -> float | None:
            known = [float(v) for v in values if v is not None]
            return statistics.median(known) if known else None

        chosen = "/".join(sorted({str(r["chosen"]) for r in group}))
        cells = [
            f"{policy} ({chosen})",
            f"{src} → {dst}",
            _cell(p50([r["total_ms"] for r in group])),
        ]
        cells += [_cell(p50([(r["phases"] or {}).get(p) for r in group])) for p in PHASES]
        cells += [_cell(p50([r["gpu_used_mib"][s] for r in group])) for s in SNAPS]
        lines.append(cells)
    reasons = sorted({f"policy {r['policy']}, {r['reason']}" for r in switches if r["reason"]})
    return "\n".join(results.table(head, lines) + [f"- {reason}" for reason in reasons])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench gpu", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--rounds", type=int, default=3, help="round trips per policy")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = [{"no_model_mib": _used_now()}]
    for policy in POLICIES:
        say(f"gpu: {policy} ...")
        rows += run_policy(policy, args.rounds)
    path = results.study(
        ".venv/bin/python -m bench gpu", args.out, "bench-gpu", llama_cpp=llama_cpp(), rows=rows
    )
    print(f"GPU memory in use before any llama-server: {_cell(rows[0]['no_model_mib'])} MiB")
    print(table(rows))
    say(f"results in {path}")
