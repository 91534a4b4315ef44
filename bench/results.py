"""The one result writer: every benchmark's JSON file, the targets it reports, and the
Markdown tables (the one run's block between the bench markers of docs/performance.md).

Targets are reported (measured value, the bound, met or not), never asserted:
a benchmark on a busy machine must not fail a build.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from bench.harness import ROOT, machine

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


# --- JSON --------------------------------------------------------------------------------


def now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()


def json_path(folder: Path, prefix: str, when: datetime.datetime) -> Path:
    """Where a run started at ``when`` writes: ``folder/<prefix>-<timestamp>.json``."""
    return folder / f"{prefix}-{when.strftime('%Y%m%d-%H%M%S')}.json"


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_json(path: Path, result: dict[str, Any]) -> Path:
    """``result`` as indented JSON at ``path`` (its folder made when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def study(command: str, folder: Path, prefix: str, **figures: Any) -> Path:
    """A study's results: its command, the date and the machine, then ``figures``;
    written to ``folder/<prefix>-<timestamp>.json``."""
    when = now()
    result = {
        "command": command,
        "date": when.isoformat(timespec="seconds"),
        "machine": machine(),
        **figures,
    }
    return write_json(json_path(folder, prefix, when), result)


# --- targets -----------------------------------------------------------------------------


def target(
    figure: str, measured: float, bound: float, text: str, unit: str = "ms", higher: bool = False
) -> dict[str, Any]:
    met = measured >= bound if higher else measured <= bound
    return {
        "figure": figure,
        "measured": round(measured, 3),
        "bound": round(bound, 3),
        "unit": unit,
        "target": text,
        "met": met,
    }


def _value(value: float, unit: str) -> str:
    if unit == "share":
        return f"{value:.1%}"
    if unit == "x":
        return f"{value:.3f}x"
    return f"{value:,.1f} {unit}" if unit == "MB" else f"{value:,.2f} {unit}"


# --- Markdown ----------------------------------------------------------------------------


def n(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, then an empty line."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def cell(t: dict[str, Any]) -> str:
    """A target's cell: its bound, met or not."""
    return f"{t['target']}: {'met' if t['met'] else '**not met**'}"


def _header(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    gpus = ", ".join(m["gpus"]) or "no GPU"
    models = ", ".join(f"`{name}`" for name in result["models"].values())
    lines = [
        f"Written by `{result['command']}` on {result['date']}: {m['cpu_model']}, "
        f"{m['cpus']} cores, {gpus}; {m['platform']}, Python {m['python']}; llama.cpp "
        f"`{result['llama_cpp']['version']}`; models {models}. Raw figures: `{result['json']}`.",
        "",
    ]
    if result["smoke"]:
        lines += ["**Smoke run: too few rounds for any figure to mean anything.**", ""]
    return lines


def markdown(result: dict[str, Any], sections: list[list[str]]) -> str:
    """The block between the bench markers of docs/performance.md: the run's header, its
    targets, then each section's lines (``sections``, in order)."""
    lines = _header(result)
    checks = result["targets"]
    if checks:
        rows = [
            [t["figure"], _value(t["measured"], t["unit"]), _value(t["bound"], t["unit"]), cell(t)]
            for t in checks
        ]
        lines += ["### Targets", "", *table(["figure", "hotmodel", "bound", "target"], rows)]
    for section in sections:
        lines += section
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the markers replaced by ``block``."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"the markers {BEGIN} ... {END} are missing")
    return text[: begin + len(BEGIN)] + "\n" + block + text[end:]
