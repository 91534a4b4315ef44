"""The local PostgreSQL that the cluster demo and the tests start (cluster/postgres.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psycopg
import pytest

from hotmodel.cluster.postgres import LocalPostgres, PostgresError, find_bin


def test_the_server_binaries_are_found() -> None:
    folder = find_bin()
    assert (folder / ("initdb.exe" if os.name == "nt" else "initdb")).is_file()


def test_a_server_keeps_its_data_across_a_restart() -> None:
    base = Path(tempfile.mkdtemp(prefix="hotmodel-pg-restart-"))
    base.chmod(0o711)
    server = LocalPostgres(base / "data")
    with server.running() as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('still here')")
    assert not (base / "data" / "postmaster.pid").exists()  # stopped on the way out
    with server.running() as url, psycopg.connect(url) as conn:
        assert conn.execute("SELECT v FROM kept").fetchone() == ("still here",)
    server.stop()  # a second stop of a stopped server is no error


@pytest.mark.skipif(os.name == "nt" or os.geteuid() != 0, reason="only root runs as another user")
def test_root_is_told_when_the_server_account_cannot_reach_the_folder() -> None:
    closed = Path(tempfile.mkdtemp(prefix="hotmodel-pg-closed-"))  # mode 0700: others stopped
    with pytest.raises(PostgresError, match="closed to other users"):
        LocalPostgres(closed / "data").start()
