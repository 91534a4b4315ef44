"""The ``hotmodel`` command line: the only place that exits the process.

``serve`` and ``setup`` run here (:mod:`.local`); ``status``, ``switch``,
``models``, ``reload`` (:mod:`.client`), ``sessions`` (:mod:`.sessions`) and
``cluster`` (:mod:`.cluster`)
ask a running server, found by ``--config``, ``--url`` or ``--port``
(:mod:`.common`, which also holds the exit codes: 0 ok, 1 runtime error,
2 usage error, 3 config error, 4 server unreachable, 130 interrupted).
"""

from __future__ import annotations

from typing import Any

import click

from hotmodel import __version__
from hotmodel.cli.client import models, reload, status, switch
from hotmodel.cli.cluster import cluster
from hotmodel.cli.common import EXIT_INTERRUPTED
from hotmodel.cli.local import serve, setup
from hotmodel.cli.sessions import sessions


class _Group(click.Group):
    """Ctrl-C in any command exits 130 with one line, as shells report SIGINT (click's
    own handling would print "Aborted!" and exit 1, like any runtime error)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hotmodel")
def cli() -> None:
    """hotmodel: one llama-server router, an OpenAI-compatible endpoint, safe model switches.

    \b
    Quick start:
      hotmodel setup --link-models .models   # build/fetch llama-server and demo models once
      hotmodel serve --config configs/demo.toml
      hotmodel models --config configs/demo.toml          # in another terminal
      hotmodel switch gemma3 --config configs/demo.toml
      curl http://127.0.0.1:18080/v1/chat/completions \\
        -H 'Content-Type: application/json' \\
        -d '{"model":"active","messages":[{"role":"user","content":"hello"}]}'

    \b
    Client commands find the server by --config FILE, --port N or --url URL.
    Exit codes: 0 ok, 1 runtime error, 2 usage error, 3 config error,
    4 no server answers, 130 interrupted.
    """


for _command in (serve, status, switch, models, reload, sessions, cluster, setup):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="hotmodel")
