"""One benchmark: everything hotmodel adds, beside the model's own server and the bare router.

    .venv/bin/python -m bench [--smoke] [--out DIR] [--docs PATH] [--only SECTION,...]
    .venv/bin/python -m bench STUDY [OPTIONS]   (gpu, fit, kv, replay, trim; --help each)

Run from the repository root. Starts `hotmodel serve` on the two cached demo
models (SmolLM2, Gemma; `hotmodel setup` provides them) and measures,
interleaved so that the machine's drift hits every path alike, each figure on
three paths: the loaded model's own llama-server process (its port from the
router's `GET /models`), the bare router hotmodel runs, and hotmodel.

Sections (one module each in bench/sections/, named as the section): proxy
(plain p50/p99, stream first byte, gap between chunks), endpoints (every inference
endpoint, plain and streamed: p50/p99 on each path), throughput (8 and 64
clients), switch (against the router's own unload + load), replay_kv
(switching back to a conversation: KV restore, replay, bare router), history
(time outside the model against 0 / 10 / 1,000 / 10,000 stored messages),
cache (prompt-cache reuse over a long conversation at its bound), rss
(hotmodel's own memory, idle and under load), scheduling (closed-loop clients
over two models: one switch per request against the scheduler's queues), cluster
(two nodes on one PostgreSQL: a forwarded request against a local one, two nodes'
throughput against one). Each
target of the performance issue is reported as met or not, never asserted.

Writes bench-results/bench-<timestamp>.json (or --out DIR) and, for a full run
of every section (or wherever --docs says), the tables between the
`<!-- bench:begin -->` / `<!-- bench:end -->` markers of docs/performance.md.
`--smoke` runs every section on the tiniest setting (the test suite does, so
the benchmark cannot rot); its numbers mean nothing.

The studies (bench/studies/) measure one question each, with their own options:
gpu (GPU memory around switches, by policy), fit (llama-server's `--fit` pass
on each load), kv (switching back: KV restore against replay, `--pause`,
`--auto`), replay (the first turn after a switch, replay on and off), trim
(prompt-cache reuse by `trim_low_water`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import results, sections
from bench.harness import (
    PLAIN,
    ROOT,
    RssSampler,
    Settings,
    client,
    find_paths,
    idle_rss_mb,
    llama_cpp,
    machine,
    say,
    serving,
)
from bench.sections import (
    cache,
    endpoints,
    history,
    proxy,
    replay_kv,
    rss,
    scheduling,
    switch,
    throughput,
)
from hotmodel.router import provision

COMMAND = ".venv/bin/python -m bench"
STUDIES = ("gpu", "fit", "kv", "replay", "trim")
SECTIONS = sections.SECTIONS
# measured on one `hotmodel serve`, in this order (switch before history: a switch
# replays the most recent session, and history creates sessions)
ON_MAIN_SERVE = ("proxy", "throughput", "switch", "history", "rss")


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=(__doc__ or "").split("\n")[0],
        epilog=f"studies: python -m bench {{{','.join(STUDIES)}}} --help",
    )
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


def _timed(name: str, section: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    say(f"{name} ...")
    t0 = time.perf_counter()
    result = section(*args)
    say(f"{name}: {time.perf_counter() - t0:.1f} s")
    return result


def _main_serve(selected: list[str], s: Settings) -> dict[str, Any]:
    """The sections measured on one `hotmodel serve` with SmolLM2 loaded."""
    out: dict[str, Any] = {}
    wanted = [name for name in ON_MAIN_SERVE if name in selected]
    if not wanted:
        return out
    with serving() as served, RssSampler(served.pid) as sampler:
        paths = find_paths(served.base_url)
        with client(60) as c:
            c.post(served.base_url + "/v1/chat/completions", json=PLAIN).raise_for_status()
        idle_start_mb = idle_rss_mb(sampler)
        for name in wanted:
            if name == "proxy":
                out[name] = _timed(name, proxy.measure, paths, s)
            elif name == "throughput":
                out[name] = _timed(name, throughput.measure, paths, s)
            elif name == "switch":
                out[name] = _timed(name, switch.measure, served.base_url, s)
                paths = find_paths(served.base_url)  # SmolLM2 again, on another port
            elif name == "history":
                out[name] = _timed(name, history.measure, paths, served.store, s)
            else:
                out[name] = _timed(name, rss.measure, paths, sampler, idle_start_mb, s)
    return out


# measured each on `hotmodel serve`s of their own, after the main one
ON_THEIR_OWN: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "endpoints": endpoints.measure,
    "replay_kv": replay_kv.measure,
    "cache": cache.measure,
    "scheduling": scheduling.measure,
    "cluster": sections.cluster.measure,
}


def _command(args: argparse.Namespace) -> str:
    words = [COMMAND]
    if args.smoke:
        words.append("--smoke")
    if args.sections != list(SECTIONS):
        words.append("--only " + ",".join(args.sections))
    return " ".join(words)


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = Settings.smoke() if args.smoke else Settings.full()
    started = time.perf_counter()
    when = results.now()
    measured = _main_serve(args.sections, s)
    for name, measure in ON_THEIR_OWN.items():
        if name in args.sections:
            measured[name] = _timed(name, measure, s)
    ordered = {name: measured[name] for name in SECTIONS if name in measured}
    return {
        "command": _command(args),
        "date": when.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": machine(),
        "llama_cpp": llama_cpp(),
        "models": {m.key: provision.model_cache_path(m).name for m in provision.DEMO_MODELS},
        "settings": s.to_json(),
        "seconds": round(time.perf_counter() - started, 1),
        "json": results.shown(results.json_path(args.out, "bench", when)),
        "sections": ordered,
        "targets": sections.targets(ordered),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in STUDIES:
        study = importlib.import_module(f"bench.studies.{argv[0]}")
        study.main(argv[1:])
        return
    args = _args(argv)
    if args.docs is not None:
        try:  # the markers are there: fail before measuring, not after
            results.replace_block(args.docs.read_text(), "")
        except (OSError, ValueError) as exc:
            sys.exit(f"python -m bench: {args.docs}: {exc}")
    result = run(args)
    json_path = results.write_json(args.out / Path(result["json"]).name, result)
    block = results.markdown(result, sections.markdown(result["sections"]))
    if args.docs is not None:
        args.docs.write_text(results.replace_block(args.docs.read_text(), block))
        say(f"tables written into {args.docs}")
    print(block)
    say(f"results in {json_path} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
