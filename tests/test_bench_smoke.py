"""The one benchmark command runs end to end on its tiniest setting, so it cannot rot.

``python -m bench --smoke`` drives the real llama-server on the real demo
models, like a user would, and writes its JSON and its Markdown tables into
a temporary copy of docs/performance.md. Nothing here asserts a time: a
benchmark on a busy machine must not fail the suite; only the shape of what
it writes (every section, every path, finite numbers) is checked, and every
check can fail: a list iterated over is first checked not to be empty.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hotmodel.control.gpu import detect_probe

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
SECTIONS = (
    "proxy",
    "endpoints",
    "throughput",
    "switch",
    "replay_kv",
    "history",
    "cache",
    "rss",
    "scheduling",
    "cluster",
)
# every endpoint the demo models serve, plain, and streamed where it streams
ENDPOINTS = (
    "chat",
    "chat, stream",
    "/v1/completions",
    "/v1/completions, stream",
    "/completion",
    "/completion, stream",
    "/v1/messages",
    "/v1/messages, stream",
    "/v1/responses",
    "/v1/responses, stream",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
    "/apply-template",
)
PATHS = ("child", "router", "hotmodel")
# proxy 5, throughput 3 (two client counts in smoke, and fresh connections), switch 2, history 1,
# cache 1, rss 2
TARGETS = 14
# one per table: the targets', then one per section, and cluster's second
TABLES = 1 + len(SECTIONS) + 1


def _outside(text: str) -> tuple[str, str]:
    before, rest = text.split(BEGIN, 1)
    return before, rest.split(END, 1)[1]


def _inside(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def _positive(*values: Any) -> None:
    for v in values:
        assert isinstance(v, int | float), v
        assert math.isfinite(v), v
        assert v > 0, v


def _run_smoke(tmp_path: Path) -> tuple[dict[str, Any], str, str]:
    original = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    docs = tmp_path / "performance.md"
    docs.write_text(original, encoding="utf-8")
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "bench", "--smoke"]
    argv += ["--out", str(out), "--docs", str(docs)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    [result_file] = out.glob("bench-*.json")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    return result, original, docs.read_text(encoding="utf-8")


def _check_sections(s: dict[str, Any]) -> None:
    for path in PATHS:
        figures = s["proxy"]["paths"][path]
        _positive(figures["plain"]["p50_ms"], figures["plain"]["p99_ms"])
        _positive(figures["stream_first_byte"]["p50_ms"], figures["stream_first_byte"]["p99_ms"])
        assert figures["chunk_gap"]["mean_ms"] >= 0
        assert figures["events_per_stream"] > 1
        for level in ("2", "4"):
            _positive(s["throughput"]["clients"][level][path]["requests_per_s"])
        _positive(s["history"]["no_session"][path]["p50_ms"])
    endpoints = s["endpoints"]["endpoints"]
    assert tuple(endpoints) == ENDPOINTS
    for name, figures in endpoints.items():
        assert figures["stream"] == name.endswith(", stream")
        kinds = ("paths", "first_byte") if figures["stream"] else ("paths",)
        for kind in kinds:
            for path in PATHS:
                assert figures[kind][path]["n"] == s["endpoints"]["rounds"], (name, kind, path)
                _positive(figures[kind][path]["p50_ms"], figures[kind][path]["p99_ms"])
    for direction in ("smollm2->gemma3", "gemma3->smollm2"):
        switch = s["switch"]["p50_ms"][direction]
        _positive(switch["router"]["unload"], switch["router"]["load"], switch["router"]["total"])
        _positive(switch["hotmodel"]["wall"], switch["hotmodel"]["load"])
    for way in ("kv_restore", "replay", "router"):
        back = s["replay_kv"]["p50_ms"][way]
        _positive(back["session_tokens"], back["switch_back"], back["total"])
    raw = s["replay_kv"]["raw"]
    assert [len(raw[way]) for way in ("kv_restore", "replay", "router")] == [1, 1, 1]
    for run in raw["kv_restore"]:
        assert run["restore"]["restored"], run
    for run in raw["replay"]:
        assert run["replay"]["prompt_tokens"] > 1, run
    for size in ("0", "10"):
        _positive(s["history"]["stored_messages"][size]["p50_ms"])
    for key in ("no_session", "0", "10"):  # read from hotmodel's Server-Timing header
        _positive(s["history"]["hotmodel_own"][key]["p50_ms"])
    assert s["cache"]["turns_past_bound"] == 4  # 6 turns, bound 4 messages: turns 3 to 6
    assert 0 <= s["cache"]["share_of_turns_90_cached"] <= 1
    assert 0 <= s["cache"]["token_share_cached"] <= 1
    rss = s["rss"]
    _positive(rss["idle_start_mb"], rss["idle_after_load_mb"], rss["peak_under_load_mb"])
    for way in ("per_request", "scheduler"):
        sched = s["scheduling"]["ways"][way]["2"]
        _positive(sched["requests"], sched["requests_per_min"], sched["latency"]["p50_ms"])
        assert sched["switches"] >= 0
    forward = s["cluster"]["forward"]
    for route in ("local", "forwarded"):
        for kind in ("plain", "stream_first_byte"):
            _positive(forward["routes"][route][kind]["p50_ms"])
    assert forward["served_by"] == {"local->a": 6, "forwarded->a": 6}  # 3 rounds, 2 each
    [(clients, level)] = s["cluster"]["throughput"]["clients"].items()
    assert clients == "2"
    for way in ("one_node", "two_nodes"):
        _positive(level[way]["requests_per_s"], level[way]["tokens_per_s"])
    assert set(level["two_nodes"]["served_by"]) == {"a", "b"}


def test_bench_smoke_writes_every_figure_and_the_docs_tables(tmp_path: Path) -> None:
    result, original, docs = _run_smoke(tmp_path)

    assert result["smoke"] is True
    assert tuple(result["sections"]) == SECTIONS
    assert result["machine"]["cpu_model"] and result["machine"]["cpus"] >= 1
    assert result["llama_cpp"]["version"]
    numbers = list(_numbers(result))
    assert len(numbers) > 100, numbers
    assert [v for v in numbers if not math.isfinite(v)] == [], "a figure is NaN or infinite"
    _check_sections(result["sections"])
    assert len(result["targets"]) == TARGETS, result["targets"]
    assert len({t["figure"] for t in result["targets"]}) == TARGETS
    for target in result["targets"]:
        assert isinstance(target["met"], bool)
        assert math.isfinite(target["measured"]) and math.isfinite(target["bound"])

    assert _outside(docs) == _outside(original), "text outside the markers changed"
    block = _inside(docs)
    assert "Smoke run" in block
    for heading in (
        "### Targets",
        "### Proxy",
        "### Endpoints",
        "### Throughput",
        "### Switch",
        "### Switching back",
    ):
        assert heading in block
    for heading in (
        "### Time outside the model",
        "### Prompt-cache reuse",
        "### hotmodel's memory",
        "### Scheduling",
        "### Cluster",
    ):
        assert heading in block
    table_rows = [line for line in block.splitlines() if line.startswith("| ")]
    assert len(table_rows) >= 30
    rules = [line for line in block.splitlines() if re.fullmatch(r"\|( --- \|)+", line)]
    assert len(rules) == TABLES, rules  # a header rule per table


def test_gpu_bench_runs_and_reports_every_switch(tmp_path: Path) -> None:
    """``python -m bench gpu`` on one round trip per policy. No GPU here: the snapshots
    are empty and ``auto`` falls back to zero_overlap, which the rows must say."""
    out = tmp_path / "gpu"
    argv = [sys.executable, "-m", "bench", "gpu", "--rounds", "1"]
    done = subprocess.run(
        [*argv, "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("bench-gpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    switches = [r for r in rows if "to" in r]
    assert [(r["policy"], r["to"]) for r in switches] == [
        ("zero_overlap", "gemma3"),
        ("zero_overlap", "smollm2"),
        ("auto", "gemma3"),
        ("auto", "smollm2"),
    ]
    gpu = detect_probe().read() is not None  # a GPU here: auto may choose overlap
    for row in switches:
        assert row["outcome"] == "ok", row
        assert row["chosen"] in (("zero_overlap", "overlap") if gpu else ("zero_overlap",)), row
        _positive(row["total_ms"], row["phases"]["load"])
    for row in switches[2:]:
        assert str(row["reason"]).startswith("auto: "), row
        assert gpu or row["reason"] == "auto: no GPU memory reading", row
    assert "| zero_overlap (zero_overlap) | smollm2 → gemma3 |" in done.stdout
