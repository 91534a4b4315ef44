#!/usr/bin/env python3
"""One benchmark: everything hotmodel adds, beside the model's own server and the bare router.

    .venv/bin/python scripts/bench.py [--smoke] [--out DIR] [--docs PATH] [--only SECTION,...]

Starts `hotmodel serve` on the two cached demo models (SmolLM2, Gemma; `hotmodel
setup` provides them) and measures, interleaved so that the machine's drift hits
every path alike, each figure on three paths: the loaded model's own
llama-server process (its port from the router's `GET /models`), the bare
router hotmodel runs, and hotmodel.

Sections: proxy (plain p50/p99, stream first byte, gap between chunks),
throughput (8 and 64 clients), switch (against the router's own unload + load),
replay_kv (switching back to a conversation: KV restore, replay, bare router),
history (time outside the model against 0 / 10 / 1,000 / 10,000 stored
messages), cache (prompt-cache reuse over a long conversation at its bound),
rss (hotmodel's own memory, idle and under load), scheduling (closed-loop
clients over two models: one switch per request against the scheduler's
queues). Each target of the
performance issue is reported as met or not, never asserted.

Writes bench-results/bench-<timestamp>.json (or --out DIR) and, for a full run
of every section (or wherever --docs says), the tables between the
`<!-- bench:begin -->` / `<!-- bench:end -->` markers of docs/performance.md.
`--smoke` runs every section on the tiniest setting (the test suite does, so
the script cannot rot); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import PLAIN, RssSampler, Settings, find_paths, idle_rss_mb
from bench_common import client as bench_client
from bench_measure import history, proxy, rss, throughput
from bench_report import markdown, replace_block, targets
from bench_sched import scheduling
from bench_switching import cache, replay_kv, switch
from benchlib import ROOT, llama_cpp, machine, serving

from hotmodel.router import provision

SECTIONS = (
    "proxy",
    "throughput",
    "switch",
    "replay_kv",
    "history",
    "cache",
    "rss",
    "scheduling",
)
# measured on one `hotmodel serve`, in this order (switch before history: a switch
# replays the most recent session, and history creates sessions)
ON_MAIN_SERVE = ("proxy", "throughput", "switch", "history", "rss")


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="every section, the tiniest setting")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results", help="folder for the JSON")
    ap.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="the Markdown file whose bench markers get the tables (default: "
        "docs/performance.md, and only for a full run of every section)",
    )
    ap.add_argument("--only", default="", help=f"comma-separated sections of: {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if not only or s in only]
    if args.docs is None and not args.smoke and not only:
        args.docs = ROOT / "docs" / "performance.md"
    return args


def _say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _timed(name: str, section: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    _say(f"{name} ...")
    t0 = time.perf_counter()
    result = section(*args)
    _say(f"{name}: {time.perf_counter() - t0:.1f} s")
    return result


def _main_serve(selected: list[str], s: Settings) -> dict[str, Any]:
    """The sections measured on one `hotmodel serve` with SmolLM2 loaded."""
    out: dict[str, Any] = {}
    wanted = [name for name in ON_MAIN_SERVE if name in selected]
    if not wanted:
        return out
    with serving() as served, RssSampler(served.pid) as sampler:
        paths = find_paths(served.base_url)
        with bench_client(60) as c:
            c.post(served.base_url + "/v1/chat/completions", json=PLAIN).raise_for_status()
        idle_start_mb = idle_rss_mb(sampler)
        store = served.config.parent / "state" / "sessions.sqlite3"
        for name in wanted:
            if name == "proxy":
                out[name] = _timed(name, proxy, paths, s)
            elif name == "throughput":
                out[name] = _timed(name, throughput, paths, s)
            elif name == "switch":
                out[name] = _timed(name, switch, served.base_url, s)
                paths = find_paths(served.base_url)  # SmolLM2 again, on another port
            elif name == "history":
                out[name] = _timed(name, history, paths, store, s)
            else:
                out[name] = _timed(name, rss, paths, sampler, idle_start_mb, s)
    return out


def _command(args: argparse.Namespace) -> str:
    words = [".venv/bin/python scripts/bench.py"]
    if args.smoke:
        words.append("--smoke")
    if args.sections != list(SECTIONS):
        words.append("--only " + ",".join(args.sections))
    return " ".join(words)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = Settings.smoke() if args.smoke else Settings.full()
    started = time.perf_counter()
    now = datetime.datetime.now().astimezone()
    sections = _main_serve(args.sections, s)
    if "replay_kv" in args.sections:
        sections["replay_kv"] = _timed("replay_kv", replay_kv, s)
    if "cache" in args.sections:
        sections["cache"] = _timed("cache", cache, s)
    if "scheduling" in args.sections:
        sections["scheduling"] = _timed("scheduling", scheduling, s)
    ordered = {name: sections[name] for name in SECTIONS if name in sections}
    json_path = args.out / f"bench-{now.strftime('%Y%m%d-%H%M%S')}.json"
    return {
        "command": _command(args),
        "date": now.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": machine(),
        "llama_cpp": llama_cpp(),
        "models": {m.key: provision.model_cache_path(m).name for m in provision.DEMO_MODELS},
        "settings": s.to_json(),
        "seconds": round(time.perf_counter() - started, 1),
        "json": _shown(json_path),
        "sections": ordered,
        "targets": targets(ordered),
    }


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.docs is not None:
        try:  # the markers are there: fail before measuring, not after
            replace_block(args.docs.read_text(), "")
        except (OSError, ValueError) as exc:
            sys.exit(f"bench.py: {args.docs}: {exc}")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / Path(result["json"]).name
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    block = markdown(result)
    if args.docs is not None:
        args.docs.write_text(replace_block(args.docs.read_text(), block))
        _say(f"tables written into {args.docs}")
    print(block)
    _say(f"results in {json_path} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
