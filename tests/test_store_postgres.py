"""The PostgreSQL store as several nodes share it: two store instances on one real
database stand for two hotmodel nodes (sessions/postgres.py). What both backends
do alike is tested over the ``store`` fixture (test_session_cache.py, test_context.py...)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import psycopg
import pytest

from hotmodel.cluster.postgres import LocalPostgres
from hotmodel.config import load_config
from hotmodel.errors import (
    SessionBusyError,
    SessionFullError,
    SessionLimitError,
    StoreError,
    StoreUnavailableError,
)
from hotmodel.router.client import RouterClient
from hotmodel.sessions.postgres import PostgresStore
from hotmodel.sessions.records import Limits, Session
from hotmodel.sessions.schema import PG_SCHEMA_VERSION
from hotmodel.sessions.service import SessionService
from tests.conftest import write_config


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def texts(session: Session | None) -> list[str]:
    assert session is not None
    return [m.message["content"] for m in session.messages]


@contextlib.asynccontextmanager
async def nodes(url: str, n: int = 2) -> AsyncIterator[list[PostgresStore]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(PostgresStore(url)) for _ in range(n)]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_a_read_after_another_nodes_write_is_never_a_stale_window(postgres_url: str) -> None:
    async def scenario() -> None:
        async with nodes(postgres_url) as (one, two):
            await one.append("", "s", [u("hi"), a("hello")], "m", "")
            assert texts(await one.get("", "s", 10)) == ["hi", "hello"]  # cached on one
            assert texts(await one.get("", "s", 10)) == ["hi", "hello"]
            hits = one.cache.hits
            await two.append("", "s", [u("q"), a("from two")], "m", "")
            assert texts(await one.get("", "s", 10)) == ["hi", "hello", "q", "from two"]
            assert one.cache.hits == hits  # a miss: the version told it
            # a rewind on two keeps the length: only the version tells
            await two.append("", "s", [a("again from two")], "m", "", rewind=3)
            assert texts(await one.get("", "s", 10))[-1] == "again from two"
            # one writes after two's write it has not read: its cache must not glue them
            await two.append("", "s", [u("two's turn"), a("x")], "m", "")
            await one.append("", "s", [u("one's turn"), a("y")], "m", "")
            expected = ["hi", "hello", "q", "again from two", "two's turn", "x", "one's turn", "y"]
            assert texts(await one.get("", "s", 10)) == expected
            assert texts(await two.get("", "s", 10)) == expected
            # deleted and started again on two: one never shows the old one
            assert await two.delete("", "s")
            assert await one.get("", "s", 10) is None
            await one.get("", "s", 10)
            await two.append("", "s", [u("new")], "m", "")
            assert texts(await one.get("", "s", 10)) == ["new"]

    run(scenario)


def test_bounds_hold_when_nodes_write_at_once(postgres_url: str) -> None:
    async def scenario() -> None:
        async with nodes(postgres_url, 3) as stores:
            limits = Limits(sessions=3, messages=6)
            new = [
                stores[i % 3].append("k", f"s{i}", [u("hi")], None, "", limits=limits)
                for i in range(12)
            ]
            results = await asyncio.gather(*new, return_exceptions=True)
            refused = [r for r in results if isinstance(r, SessionLimitError)]
            assert len(refused) == 9 and results.count(None) == 3
            assert await stores[0].owned("k") == 3
            created = [s.id for s in await stores[0].list("k")]
            turns = [
                stores[i % 3].append("k", created[0], [u("q"), a("r")], "m", "", limits=limits)
                for i in range(6)
            ]
            results = await asyncio.gather(*turns, return_exceptions=True)
            assert results.count(None) == 2  # 1 + 2 + 2 + 2 would be 7 > 6
            assert all(isinstance(r, SessionFullError) for r in results if r is not None)
            session = await stores[1].get("k", created[0])
            assert session is not None and len(session.messages) == 5
            roles = [m.message["role"] for m in session.messages]
            assert roles == ["user", "user", "assistant", "user", "assistant"]

    run(scenario)


def _lock_connections(store: PostgresStore) -> int:
    assert store._locks is not None
    stats = store._locks.get_stats()
    return int(stats.get("pool_size", 0)) - int(stats.get("pool_available", 0))


async def _all_released(url: str, *stores: PostgresStore, deadline_s: float = 10.0) -> None:
    """No advisory lock is held on the server, and no lock connection is out of its pool.
    A connection closed on a cancelled path ends on the server, and is replaced by the
    pool, in the background: polled up to ``deadline_s``, not read once."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
            locked = (await cur.fetchone() or (1,))[0]
            out = [_lock_connections(s) for s in stores]
            if locked == 0 and not any(out):
                return
            assert loop.time() < end, f"{locked} advisory lock(s) held, connections out: {out}"
            await asyncio.sleep(0.05)


def test_a_sessions_turn_lock_holds_across_nodes_and_is_released_on_every_path(
    postgres_url: str,
) -> None:
    async def scenario() -> None:
        async with nodes(postgres_url) as (one, two):
            async with one.turn_lock("", "s", 1):
                with pytest.raises(SessionBusyError, match=r"still running after 0\.2s"):
                    async with two.turn_lock("", "s", 0.2):
                        raise AssertionError("two got a lock one holds")
                with pytest.raises(SessionBusyError):
                    async with two.turn_lock("", "s", 0):  # no wait at all
                        raise AssertionError
                async with two.turn_lock("", "other", 1):  # other sessions: no wait
                    pass
            async with two.turn_lock("", "s", 1):  # released after the turn
                pass
            # an error in the turn releases it
            with pytest.raises(RuntimeError):
                async with one.turn_lock("", "s", 1):
                    raise RuntimeError("the turn failed")
            async with two.turn_lock("", "s", 0):
                pass
            # a holder cancelled mid-turn (a client that left) releases it
            held = asyncio.Event()

            async def hold_forever() -> None:
                async with one.turn_lock("", "s", 1):
                    held.set()
                    await asyncio.Event().wait()

            task = asyncio.create_task(hold_forever())
            await held.wait()
            waiting = asyncio.create_task(_take(two, 10))
            await asyncio.sleep(0.2)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.wait_for(waiting, 5)  # the waiter gets it as soon as it is freed
            # a waiter cancelled while it waits leaves no lock behind
            async with one.turn_lock("", "s", 1):
                waiter = asyncio.create_task(_take(two, 30))
                await asyncio.sleep(0.3)
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
            async with one.turn_lock("", "s", 0), two.turn_lock("", "t", 0):
                pass
            async with two.turn_lock("", "s", 2):
                pass
            await _all_released(postgres_url, one, two)

    run(scenario)


async def _take(store: PostgresStore, timeout: float) -> None:
    async with store.turn_lock("", "s", timeout):
        pass


def test_nodes_starting_together_migrate_once_and_a_newer_schema_is_refused(
    postgres_url: str,
) -> None:
    async def scenario() -> None:
        async with nodes(postgres_url, 4) as stores:
            await stores[0].append("", "s", [u("hi")], None, "")
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT version, (SELECT COUNT(*) FROM schema_version) FROM schema_version"
            ).fetchone()
            assert row == (PG_SCHEMA_VERSION, 1)
            conn.execute("UPDATE schema_version SET version = %s", (PG_SCHEMA_VERSION + 1,))
        with pytest.raises(StoreError, match="newer than this hotmodel knows"):
            async with PostgresStore(postgres_url):
                pass

    run(scenario)


def test_a_refused_query_is_a_store_error_without_the_url(postgres_url: str) -> None:
    async def scenario() -> None:
        async with PostgresStore(postgres_url) as store:
            await store.append("", "s", [u("hi")], None, "")
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute(
                    f"ALTER DATABASE {postgres_url.rsplit('/', 1)[1]} "
                    "SET default_transaction_read_only = on"
                )
            async with PostgresStore(postgres_url) as other:  # new connections: read-only
                with pytest.raises(StoreError) as caught:
                    await other.append("", "s", [u("no")], None, "")
            assert not isinstance(caught.value, StoreUnavailableError)
            assert caught.value.public == "the session store could not be read or written"
            assert "read-only" in str(caught.value)

    run(scenario)


def test_a_server_that_goes_away_is_503_and_comes_back_with_everything(
    tmp_path: Path,
) -> None:
    base = Path(tempfile.mkdtemp(prefix="hotmodel-pg-down-"))
    base.chmod(0o711)
    server = LocalPostgres(base / "data")

    async def scenario() -> None:
        url = server.start()
        try:
            async with PostgresStore(url, connect_wait=1.0) as store:
                await store.append("", "s", [u("hi"), a("hello")], "m", "")
                await asyncio.to_thread(server.stop)
                with pytest.raises(StoreUnavailableError, match="cannot be reached"):
                    await store.get("", "s", 10)
                with pytest.raises(StoreUnavailableError):
                    await store.append("", "s", [u("lost?")], "m", "")
                with pytest.raises(StoreUnavailableError):
                    async with store.turn_lock("", "s", 1):
                        pass
                await asyncio.to_thread(server.start)
                assert texts(await store.get("", "s", 10)) == ["hi", "hello"]
                await store.append("", "s", [u("after")], "m", "")
                assert texts(await store.get("", "s")) == ["hi", "hello", "after"]
        finally:
            server.stop()

    run(scenario)


def test_two_nodes_services_serialise_one_sessions_turns(postgres_url: str, tmp_path: Path) -> None:
    """SessionService.hold (what chat and messages take): the in-process lock, then the
    store's turn lock; the second node's wait ends in the same 409 as on one node."""
    (tmp_path / "m.gguf").write_bytes(b"")
    config = load_config(write_config(tmp_path, {"m": tmp_path / "m.gguf"}, "m"))

    async def scenario() -> None:
        async with nodes(postgres_url) as (one, two):
            a = SessionService(config, one, cast(RouterClient, None))
            b = SessionService(config, two, cast(RouterClient, None))
            ref = a.check("s", None)
            async with a.hold(ref, 1):
                with pytest.raises(SessionBusyError, match=r"'s' is still running after 0\.3s"):
                    async with b.hold(ref, 0.3):
                        raise AssertionError
            async with b.hold(ref, 1):
                pass
            assert len(a.locks) == len(b.locks) == 0

    run(scenario)
