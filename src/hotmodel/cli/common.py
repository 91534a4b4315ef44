"""What every command shares: exit codes, the config, where the server is, and one HTTP call.

Client commands (status, switch, models, reload, sessions) talk to a running
``hotmodel serve``. Which one: ``--url`` if given, else the config's host
with ``--port`` (or the config's port). A server started with ``serve
--port N`` is reached with ``--port N``: nothing guesses, so nothing asks
the wrong server silently. Every way a call can fail (nothing listening, a
key refused, an older server without the endpoint, something that is not
hotmodel) becomes one line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx

from hotmodel.config import Config, load_config
from hotmodel.errors import ConfigError

# Exit codes (0: ok). 2, a usage error, is click's own for bad flags and arguments.
EXIT_ERROR = 1  # a runtime error: the server said no, a switch failed, a build failed
EXIT_CONFIG = 3
EXIT_UNREACHABLE = 4  # nothing answers at the server's address
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

API_KEY_ENV = "HOTMODEL_API_KEY"  # the key the client commands act as
DEFAULT_HOST = "127.0.0.1"


class CliError(click.ClickException):
    """One line on stderr (``error: ...``) and exit 1; click prints it and exits.

    ``error`` is the server's error object when the server gave one (OpenAI's shape:
    message, type, param, code); ``--json`` prints it (:meth:`to_json`).
    """

    exit_code = EXIT_ERROR
    code: str | None = None  # the error's code when the CLI, not the server, says it

    def __init__(self, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)

    def to_json(self) -> dict[str, Any]:
        """``{"error": {...}}``: the server's own error object (with the CLI's words for
        it as ``message``), or one in the same shape for what failed here."""
        error = {"message": self.format_message(), "type": "cli_error", "param": None}
        error["code"] = self.code
        if self.error is not None:
            error = {**error, **self.error, "message": self.format_message()}
        return {"error": error}


class ConfigFileError(CliError):
    """A config file is missing or invalid: exit 3."""

    exit_code = EXIT_CONFIG
    code = "invalid_config"


class UnreachableError(CliError):
    """Nothing answers at the server's address: exit 4."""

    exit_code = EXIT_UNREACHABLE
    code = "unreachable"


class CommandInterruptedError(CliError):
    """Ctrl-C, with a word on what goes on without us: exit 130."""

    exit_code = EXIT_INTERRUPTED
    code = "interrupted"


def load(config_path: Path) -> Config:
    """The validated config, or exit 3 with the error that names file, section and key."""
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise ConfigFileError(str(exc)) from exc


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@dataclass(frozen=True, slots=True)
class Target:
    """The running server a client command talks to, and the config it was found by."""

    url: str
    config: Config | None

    def headers(self, *, admin: bool) -> dict[str, str]:
        """The Authorization header to send: for admin endpoints the config's first admin
        key, for the others ``HOTMODEL_API_KEY`` (to act as that client) before the
        config's keys; ``HOTMODEL_API_KEY`` also when the config has no fitting key
        (``--url`` without ``--config``); none when there is no key at all."""
        env = os.environ.get(API_KEY_ENV) or None
        admin_keys = self.config.keys.admin if self.config is not None else ()
        client_keys = self.config.keys.client if self.config is not None else ()
        if admin:
            chosen = next(iter(admin_keys), None) or env
        else:
            chosen = env or next(iter(admin_keys), None) or next(iter(client_keys), None)
        return {"authorization": f"Bearer {chosen}"} if chosen else {}


def proxy_url(host: str, port: int) -> str:
    """The URL to reach a server listening on ``host:port`` (a wildcard means this machine)."""
    if host in ("0.0.0.0", "::", ""):
        host = DEFAULT_HOST
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _check_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--url``: an http(s) URL; a trailing ``/v1`` (the OpenAI base URL) is dropped."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(f"{value!r} is no http:// or https:// URL", ctx, param)
    url = value.rstrip("/")
    return url.removesuffix("/v1")


def resolve_target(config_path: Path | None, url: str | None, port: int | None) -> Target:
    """Where the server is: ``--url``, else the config's host with ``--port`` or its port."""
    config = load(config_path) if config_path is not None else None
    if url is not None:
        return Target(url, config)
    if config is not None:
        return Target(proxy_url(config.server.host, port or config.server.port), config)
    if port is not None:
        return Target(proxy_url(DEFAULT_HOST, port), None)
    raise click.UsageError(
        "which server? give --config FILE (the one `hotmodel serve` runs with), "
        "--url URL or --port N",
        click.get_current_context(silent=True),
    )


_CLIENT_OPTIONS = (
    click.option(
        "--config",
        "-c",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The config the server runs with (its address and keys). Optional with --url "
        "or --port.",
    ),
    click.option(
        "--url",
        callback=_check_url,
        default=None,
        help="The server's URL, e.g. http://127.0.0.1:18080 (overrides --config and --port).",
    ),
    click.option(
        "--port",
        type=click.IntRange(1, 65535),
        default=None,
        help="The server's port, when it was started with `serve --port N`.",
    ),
)


def client_command(func: Callable[..., None]) -> Callable[..., None]:
    """Add ``--config``, ``--url`` and ``--port`` to a command; it receives ``target``.

    With ``--json``, a failure is JSON too: the error object goes to stdout (the
    one-line message to stderr, the exit code as without ``--json``), so a script
    reads one shape whatever happened.
    """

    @functools.wraps(func)
    def wrapper(
        *args: Any, config_path: Path | None, url: str | None, port: int | None, **kwargs: Any
    ) -> None:
        try:
            func(*args, target=resolve_target(config_path, url, port), **kwargs)
        except CliError as exc:
            if kwargs.get("as_json"):
                echo_json(exc.to_json())
            raise

    for option in reversed(_CLIENT_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def call(
    target: Target,
    method: str,
    path: str,
    *,
    admin: bool,
    body: Any = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """One request to the server; its JSON answer, or a :class:`CliError` saying why not."""
    try:
        resp = httpx.request(
            method,
            target.url + path,
            json=body,
            timeout=timeout,
            trust_env=False,
            headers=target.headers(admin=admin),
        )
    except httpx.HTTPError as exc:
        raise transport_error(target, exc, timeout) from exc
    return answer(target, resp, method, path)


def transport_error(target: Target, exc: httpx.HTTPError, timeout: float) -> CliError:
    """The server could not be reached, or stopped answering: exit 4 or 1."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return UnreachableError(
            f"no hotmodel answers at {target.url} "
            "(is `hotmodel serve` running? started with --port?)"
        )
    if isinstance(exc, httpx.TimeoutException):
        return CliError(
            f"{target.url} took the request but did not answer in {timeout:g} s (what it "
            "started goes on: see `hotmodel status`)"
        )
    return CliError(f"talking to {target.url} failed ({exc}): is it hotmodel? (see --url/--port)")


def _sent_key(resp: httpx.Response) -> str:
    """Which key the CLI sent that the server refused, and what to do about it."""
    sent = resp.request.headers.get("authorization", "").removeprefix("Bearer ")
    if not sent:
        return f"the CLI sent no key): pass --config with the server's config, or set {API_KEY_ENV}"
    if sent == os.environ.get(API_KEY_ENV):
        return (
            f"the CLI sent the key in {API_KEY_ENV}): set it to one of the server's keys, "
            "or unset it to send the --config's"
        )
    return "the CLI sent the first key of --config's [security]): is it the server's config?"


def answer(target: Target, resp: httpx.Response, method: str, path: str) -> dict[str, Any]:
    """The JSON object of a successful answer; an error answer becomes one clear line."""
    try:
        parsed: Any = resp.json()
    except ValueError:
        parsed = None
    # every answer of hotmodel is a JSON object
    data: dict[str, Any] | None = parsed if isinstance(parsed, dict) else None
    if resp.status_code < 400 and data is not None:
        return data
    if data is None or not isinstance(data.get("error"), dict):
        raise CliError(
            f"{target.url} answered {method} {path} with HTTP {resp.status_code} and no "
            "hotmodel JSON: is it hotmodel? (see --url/--port)"
        )
    error: dict[str, Any] = data["error"]
    message = str(error.get("message") or f"HTTP {resp.status_code}")
    if resp.status_code == 404 and error.get("code") == "not_found":
        raise CliError(
            f"the server at {target.url} has no {method} {path}: it runs an older hotmodel "
            "(restart it with this version)",
            error,
        )
    if resp.status_code == 401:
        raise CliError(f"{message} (HTTP 401; {_sent_key(resp)})", error)
    if resp.status_code == 403:
        raise CliError(
            f"{message} (HTTP 403): this command needs an admin key; pass --config with the "
            f"server's config (its first admin key is sent), or set {API_KEY_ENV} to one",
            error,
        )
    raise CliError(message, error)
