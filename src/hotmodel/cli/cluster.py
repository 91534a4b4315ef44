"""``hotmodel cluster``: the nodes of the running server's cluster (``GET /admin/cluster``)."""

from __future__ import annotations

from typing import Any

import click

from hotmodel.cli.common import Target, call, client_command, echo_json


@click.command(short_help="List the nodes of the server's cluster.")
@client_command
@click.option("--json", "as_json", is_flag=True, help="Print the JSON answer.")
def cluster(target: Target, as_json: bool) -> None:
    """List the nodes the running server sees in its cluster: each one's URL, whether it
    is alive (its last heartbeat), what it has loaded and how busy it is."""
    data = call(target, "GET", "/admin/cluster", admin=True, timeout=10.0)
    if as_json:
        echo_json(data)
        return
    if not data.get("enabled"):
        click.echo("not in a cluster (no [cluster] section in its config)")
        return
    for line in nodes_table(data.get("nodes") or []):
        click.echo(line)
    if data.get("error"):
        click.echo(f"registry: {data['error']}")


def nodes_table(nodes: list[dict[str, Any]]) -> list[str]:
    rows = [("NODE", "URL", "STATE", "LOADED", "IN FLIGHT", "QUEUED")]
    for n in nodes:
        state = ("alive" if n.get("alive") else "out") + (" (this)" if n.get("self") else "")
        rows.append(
            (
                str(n.get("id")),
                str(n.get("url")),
                state,
                ", ".join(n.get("loaded") or []) or "-",
                str(sum((n.get("in_flight") or {}).values())),
                str(sum((n.get("queued") or {}).values())),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
