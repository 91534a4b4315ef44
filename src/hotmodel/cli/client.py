"""Client commands on the running server: ``status``, ``switch``, ``models``, ``reload``.

Each prints for people by default and the server's JSON with ``--json`` (for
scripts); each finds the server the same way (:mod:`hotmodel.cli.common`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import click
import httpx

from hotmodel import sse
from hotmodel.cli.common import (
    EXIT_ERROR,
    CliError,
    CommandInterruptedError,
    Target,
    answer,
    call,
    client_command,
    echo_json,
    transport_error,
)

_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the JSON answer (or the error's, on a failure)."
)


@click.command(short_help="Show the running server's state.")
@client_command
@_json_option
def status(target: Target, as_json: bool) -> None:
    """Ask the running hotmodel server for its state, active model, router pid and uptime."""
    data = call(target, "GET", "/admin/status", admin=True, timeout=5.0)
    if as_json:
        echo_json(data)
        return
    router = data.get("router") or {}
    click.echo(
        f"hotmodel {data.get('version')}  state: {data.get('state')}  "
        f"uptime: {data.get('uptime_seconds')}s  url: {target.url}"
    )
    click.echo(f"active model: {active_line(data)}  presets: {', '.join(data.get('presets', []))}")
    click.echo(
        f"router: pid {router.get('pid')}  state {router.get('state')}  "
        f"url {router.get('url')}  uptime {router.get('uptime_seconds')}s"
    )
    click.echo(f"router log: {router.get('log_file')}")


def active_line(data: dict[str, Any]) -> str:
    """The active model, or what stands in for it: an idle-unloaded model the next request
    loads back, or none."""
    active, parked = data.get("active_model"), data.get("parked_model")
    if active:
        return str(active)
    if parked:
        return f"none ({parked} was unloaded for idleness; the next request loads it)"
    return "none"


@click.command(short_help="List the models (presets): status, active, size on disk.")
@client_command
@_json_option
def models(target: Target, as_json: bool) -> None:
    """List the server's presets: the router's status of each, which one is active, and
    the size of its GGUF file on disk."""
    data = call(target, "GET", "/v1/models", admin=False, timeout=10.0)
    if as_json:
        echo_json(data)
        return
    for line in models_table(data.get("data") or []):
        click.echo(line)


def models_table(entries: list[dict[str, Any]]) -> list[str]:
    """The ``hotmodel models`` table: one row per preset, columns aligned."""
    rows = [("PRESET", "STATUS", "ACTIVE", "SIZE")]
    rows += [
        (
            str(m.get("id")),
            str(m.get("status", "unknown")),
            "*" if m.get("active") else ("idle" if m.get("parked") else ""),
            human_size(m.get("size_bytes")),
        )
        for m in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>9}".rstrip()
        for r in rows
    ]


def human_size(size: Any) -> str:
    """``241.4 MiB``; ``-`` when the server knows no local file (missing, or remote)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@click.command(short_help="Re-read the config and apply what can change while running.")
@client_command
@_json_option
def reload(target: Target, as_json: bool) -> None:
    """Ask the running server to re-read its config files and apply the settings that
    can change without a restart; print what was applied and what needs a restart.

    Exits 1 when the server refuses (an invalid file: the running config
    stays) or when loading the active model again (its preset changed) failed.
    """
    data = call(target, "POST", "/admin/reload", admin=True, timeout=900.0)
    report = data.get("switch")
    if as_json:
        echo_json(data)
    else:
        print_reload(data)
    if isinstance(report, dict) and report.get("outcome") == "failed":
        raise click.exceptions.Exit(EXIT_ERROR)


def print_reload(data: dict[str, Any]) -> None:
    """The answer of ``POST /admin/reload`` for people."""
    applied = data.get("applied") or []
    restart = data.get("restart_needed") or []
    presets = data.get("presets_changed") or []
    if not data.get("changed") and not (applied or restart or presets):
        click.echo("config unchanged: nothing to apply")
        return
    reverted = data.get("reverted")
    done = "tried, then taken back" if isinstance(reverted, dict) else "applied"
    for title, items in (
        (done, applied),
        (f"presets changed ({done})" if reverted else "presets changed", presets),
        ("need a restart of `hotmodel serve` to take effect", restart),
    ):
        if items:
            click.echo(f"{title} ({len(items)}):")
            click.echo("\n".join(f"  {_setting(item)}" for item in items))
    if isinstance(data.get("switch"), dict):
        click.echo("the active model's preset changed; it was loaded again:")
        print_report(data["switch"])
    if isinstance(reverted, dict):
        _print_reverted(reverted)
    if data.get("note"):
        click.echo(f"note: {data['note']}")


def _print_reverted(reverted: dict[str, Any]) -> None:
    back = reverted.get("switch")
    if not isinstance(back, dict):
        click.echo(f"the reload was taken back: {reverted.get('note')}")
        return
    with_it = (
        "and the model was loaded with it:"
        if back.get("outcome") == "ok"
        else "but the model did not load with it either:"
    )
    click.echo(
        "it did not load with its new preset: "
        f"the previous configuration is in force again, {with_it}"
    )
    print_report(back)


def _setting(item: Any) -> str:
    return item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)


@click.command(short_help="Switch the active model, showing each phase.")
@click.argument("model")
@client_command
@_json_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=900.0,
    show_default=True,
    help="Seconds to wait for the switch to finish.",
)
def switch(model: str, target: Target, as_json: bool, timeout: float) -> None:
    """Switch the running server to preset MODEL, showing each phase as it ends.

    Exits 0 when MODEL is active afterwards, 1 when the switch failed (the
    report says which model is active then).
    """
    try:
        report = _stream_switch(target, model, as_json, timeout)
    except KeyboardInterrupt:
        raise CommandInterruptedError(
            "interrupted; the switch goes on in the server (`hotmodel status` shows the outcome)"
        ) from None
    if as_json:
        echo_json(report)
    else:
        print_report(report)
    if report["outcome"] == "failed":
        raise click.exceptions.Exit(EXIT_ERROR)


def _stream_switch(target: Target, model: str, as_json: bool, timeout: float) -> dict[str, Any]:
    """POST the switch with ``stream: true``; print its phases as they come; the report."""
    path = "/admin/switch"
    report: dict[str, Any] | None = None
    try:
        with httpx.stream(
            "POST",
            target.url + path,
            json={"model": model, "stream": True},
            timeout=timeout,
            trust_env=False,
            headers=target.headers(admin=True),
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                answer(target, resp, "POST", path)  # raises the error it carries
                raise CliError(f"the server answered the switch with HTTP {resp.status_code}")
            phases = _PhasePrinter(quiet=as_json)
            try:
                for event, data in _sse_events(resp):
                    if event == "phase":
                        phases.show(data)
                    elif event == "report":
                        report = data
                    elif event == "error":
                        message = str(data.get("message"))
                        error = {"message": message, "type": "server_error", "param": None}
                        raise CliError(message, {**error, "code": data.get("code")})
            finally:
                phases.close()
    except httpx.HTTPError as exc:
        raise transport_error(target, exc, timeout) from exc
    if report is None:
        raise CliError("the server ended the switch stream without a report")
    return report


def _sse_events(resp: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    parser = sse.SseParser()
    for chunk in resp.iter_bytes():
        for event in parser.feed(chunk):
            yield event.event, event.json()


class _PhasePrinter:
    """One line per phase, printed when the phase ends (done, skipped, failed): each
    phase shows once, in the order the switch finishes them, which is its plan's
    order. A phase that starts while another one runs (a CPU-only switch saves and
    unloads the leaving model while the next one loads) says so, ``(beside the load;
    ...)``, and its line comes before the longer phase's. On a terminal, what runs now
    (with the load's progress) shows on a last line that the next one replaces."""

    def __init__(self, quiet: bool, live: bool | None = None) -> None:
        self.quiet = quiet
        self.live = sys.stdout.isatty() if live is None else live
        self.running: dict[str, str | None] = {}  # started, not ended: its progress
        self.beside: dict[str, str] = {}  # a phase -> the one that ran when it started
        self.shown = 0  # the width of the live line on screen (0: none)
        self.drawn = ""  # its text

    def show(self, data: dict[str, Any]) -> None:
        if self.quiet:
            return
        phase, status = str(data["phase"]), str(data["status"])
        if status == "started":
            if self.running:
                self.beside.setdefault(phase, next(iter(self.running)))
            self.running[phase] = None
        elif status == "progress":
            if phase in self.running:
                self.running[phase] = str(data.get("detail") or "") or None
        else:
            self.running.pop(phase, None)
            self._clear()
            click.echo(self._line(phase, status, data))
        self._draw()

    def _line(self, phase: str, status: str, data: dict[str, Any]) -> str:
        ms = f" {data['ms']:>9.1f} ms" if data.get("ms") is not None else ""
        notes = [f"beside the {self.beside.pop(phase)}"] if phase in self.beside else []
        if data.get("detail"):
            notes.append(str(data["detail"]))
        detail = f"  ({'; '.join(notes)})" if notes else ""
        return f"  {phase:<9} ... {status}{ms}{detail}"

    def _draw(self) -> None:
        """The live line: the phases running now (a terminal only)."""
        if not self.live:
            return
        text = "  " + ", ".join(
            f"{phase} ... {progress or ''}".rstrip() for phase, progress in self.running.items()
        )
        if self.shown and text == self.drawn:
            return  # the router repeats a stage's progress value
        self._clear()
        if self.running:
            click.echo(text, nl=False)
            self.shown, self.drawn = len(text), text

    def _clear(self) -> None:
        if self.shown:
            click.echo("\r" + " " * self.shown + "\r", nl=False)
            self.shown = 0

    def close(self) -> None:
        """The stream ended: take the live line away (the report or the error follows)."""
        self.running.clear()
        self._clear()


def print_report(report: dict[str, Any]) -> None:
    """A switch report for people: outcome, duration, GPU memory, warnings."""
    if report["outcome"] == "already_active":
        click.echo(f"{report['to']} is already active")
        return
    if report["outcome"] == "ok":
        click.echo(
            f"switched {report['from']} -> {report['to']} in {report['total_ms']:.0f} ms "
            f"({report['policy']})"
        )
    else:
        click.echo(f"switch {report['from']} -> {report['to']} FAILED: {report['error']}")
        back = " (rolled back)" if report["rolled_back"] else ""
        click.echo(f"active model now: {report['active_after']}{back}")
        if report.get("log_tail"):
            click.echo("--- llama-server log tail ---\n" + report["log_tail"])
    gpu = report["gpu"]
    if any(gpu.values()):
        shown = ", ".join(f"{k} {v['used_mib']}" if v else f"{k} n/a" for k, v in gpu.items())
        click.echo(f"GPU memory used (MiB): {shown}")
    else:
        click.echo("GPU memory: no GPU visible")
    for warning in report.get("warnings", []):
        click.echo(f"warning: {warning}")
