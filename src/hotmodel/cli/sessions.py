"""``hotmodel sessions list|show|delete``: the running server's stored conversations.

They act as the client whose key is sent (``HOTMODEL_API_KEY``, else the
config's keys): with keys set, each key sees only its own sessions.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote, urlencode

import click

from hotmodel.cli.common import Target, call, client_command, echo_json

_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the JSON answer (or the error's, on a failure)."
)
PAGE = 1000  # sessions asked for per request (the server's largest page)


@click.group(short_help="List, show (export) or delete sessions.")
def sessions() -> None:
    """List, show (export as JSON with --json) or delete the sessions of the running server."""


def _when(timestamp: Any) -> str:
    if not isinstance(timestamp, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _path(session_id: str) -> str:
    return f"/v1/sessions/{quote(session_id, safe='')}"


@sessions.command("list")
@client_command
@_json_option
def sessions_list(target: Target, as_json: bool) -> None:
    """List sessions, most recently used first."""
    data = list_all(target)
    if as_json:
        echo_json(data)
        return
    if not data:
        click.echo("no sessions")
    for s in data:
        click.echo(
            f"{s['id']}  {s['messages']} message(s)  "
            f"system prompt: {s['system_prompt'] or '-'}  last used {_when(s['updated_at'])}"
        )


def list_all(target: Target) -> list[dict[str, Any]]:
    """Every session: the server's pages, followed to the end (the first is the plain
    list, the default page; an older server answers it whole, without has_more)."""
    data: list[dict[str, Any]] = []
    path = "/v1/sessions"
    while True:
        page = call(target, "GET", path, admin=False)
        data += page.get("data") or []
        last = page.get("last_id")
        if not page.get("has_more") or not isinstance(last, str):
            return data
        path = f"/v1/sessions?{urlencode({'limit': PAGE, 'after': last})}"


@sessions.command("show")
@click.argument("session_id")
@client_command
@_json_option
def sessions_show(session_id: str, target: Target, as_json: bool) -> None:
    """Print one session with all its messages; with --json, the export (every stored
    message with the model that wrote it and its time)."""
    data = call(target, "GET", _path(session_id), admin=False)
    if as_json:
        echo_json(data)
        return
    messages = data.get("messages") or []
    click.echo(
        f"session {data.get('id')}  {len(messages)} message(s)  "
        f"system prompt: {data.get('system_prompt') or '-'}  "
        f"created {_when(data.get('created_at'))}  last used {_when(data.get('updated_at'))}"
    )
    for message in messages:
        click.echo(transcript_line(message))


def transcript_line(message: dict[str, Any]) -> str:
    """``[time] role (model): text`` for one stored message; text parts of a multi-part
    content are joined, other parts shown by their type."""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(
            str(part.get("text", "")) if part.get("type") == "text" else f"<{part.get('type')}>"
            for part in content
            if isinstance(part, dict)
        )
    model = f" ({message['model']})" if message.get("model") else ""
    when = _when(message.get("created_at"))
    return f"[{when}] {message.get('role')}{model}: {content if content is not None else ''}"


@sessions.command("delete")
@click.argument("session_id")
@client_command
@_json_option
def sessions_delete(session_id: str, target: Target, as_json: bool) -> None:
    """Delete one session (and its KV snapshots)."""
    data = call(target, "DELETE", _path(session_id), admin=False)
    if as_json:
        echo_json(data)
        return
    click.echo(f"deleted {session_id}")
