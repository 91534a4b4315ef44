"""The shared session store: PostgreSQL, for several hotmodel nodes (``[store] url``).

The same interface and behaviour as the SQLite store (:mod:`hotmodel.sessions.sqlite`),
on psycopg 3's async connections from a pool (``[store] pool_size``). Every
psycopg error becomes a :class:`~hotmodel.errors.StoreError` in
:meth:`PostgresStore._mapped`, the one place the library is entered; a
server that cannot be reached (a refused or broken connection, no pooled
connection in :data:`CONNECT_WAIT_S`) is a
:class:`~hotmodel.errors.StoreUnavailableError` (503): nothing was written, and
what needs no store goes on. Connections are checked as they leave the pool,
so a restarted server is used again without a failed request.

Several nodes write at once, so what SQLite gets from its one writer is locked
here: an append locks its session's row (``FOR UPDATE``), and one that creates a
session first takes its owner's transaction advisory lock, so the bounds (sessions
per owner, messages per session) hold across nodes. A node's window cache
(:mod:`hotmodel.sessions.cache`) keeps each session's ``version`` (new from one
sequence on every append): a read compares it with the session's row, which it
reads anyway, so another node's append is never answered from a stale window.
:meth:`PostgresStore.turn_lock` holds a session advisory lock for a turn on a
connection of its own (a second pool, ``[store] lock_pool_size``), so a
session's turns keep their order across nodes; it is released on every path
(a connection whose state is unsure is closed, which releases it too).

Migrations are versioned like SQLite's (``schema.PG_MIGRATIONS``, table
``schema_version``), one transaction per step under an advisory lock, so nodes
starting together migrate once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from hotmodel.config import redact_url
from hotmodel.errors import SessionLimitError, StoreError, StoreUnavailableError
from hotmodel.sessions.cache import WindowCache, cost
from hotmodel.sessions.locks import busy
from hotmodel.sessions.postgres_locks import advisory_lock, lock_key, migrate
from hotmodel.sessions.postgres_responses import PostgresResponses
from hotmodel.sessions.records import (
    NOT_A_CHAIN,
    Limits,
    Page,
    Session,
    SessionSummary,
    StoredMessage,
)

Connection = psycopg.AsyncConnection[Any]
CONNECT_WAIT_S = 5.0  # at most this long for a pooled connection before a 503
_UNREACHABLE = ("08", "57P01", "57P02", "57P03")  # connection lost, server shut down/starting
_HEADER = "SELECT id, system_prompt, created_at, updated_at, version FROM sessions "
_SUMMARIES = (
    "SELECT s.id, s.system_prompt, s.created_at, s.updated_at, "
    "(SELECT COALESCE(MAX(m.seq) + 1, 0) FROM messages m "
    "WHERE m.owner = s.owner AND m.session_id = s.id) "
    "FROM sessions s WHERE s.owner = %s "
)


def unreachable(exc: psycopg.Error) -> bool:
    """Whether ``exc`` says the server cannot be reached (rather than refused a query)."""
    if isinstance(exc, PoolTimeout):
        return True
    state = exc.sqlstate
    return isinstance(exc, psycopg.OperationalError) and (
        state is None or state.startswith(_UNREACHABLE)
    )


class PostgresStore:
    """Sessions in a PostgreSQL database several nodes share. Open with ``async with``."""

    def __init__(
        self,
        url: str,
        pool_size: int = 10,
        lock_pool_size: int = 64,
        connect_wait: float = CONNECT_WAIT_S,
    ) -> None:
        self.url = url
        self.connect_wait = connect_wait
        self.pool_size = pool_size
        self.lock_pool_size = lock_pool_size
        self.cache = WindowCache()
        self.responses = PostgresResponses(self)
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._locks: AsyncConnectionPool[Connection] | None = None

    def __str__(self) -> str:
        return redact_url(self.url)

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _new_pool(self, min_size: int, max_size: int, name: str) -> AsyncConnectionPool[Connection]:
        return AsyncConnectionPool(
            self.url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            timeout=self.connect_wait,
            # a connection that fails is tried again with a backoff that ends within this
            # time, then a new request starts a new try: a server back after a long
            # outage is used at once, not after a backoff grown meanwhile
            reconnect_timeout=self.connect_wait,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(self.connect_wait))},
            check=AsyncConnectionPool.check_connection,
            name=name,
        )

    async def open(self) -> None:
        pool = self._new_pool(1, self.pool_size, "hotmodel-store")
        locks = self._new_pool(0, self.lock_pool_size, "hotmodel-turn-locks")
        try:
            with self._mapped("the session store (PostgreSQL) could not be opened"):
                await pool.open(wait=True, timeout=self.connect_wait)
                await locks.open()
                async with pool.connection() as conn:
                    await migrate(conn)
        except BaseException:
            await locks.close()
            await pool.close()
            raise
        self._pool, self._locks = pool, locks

    async def close(self) -> None:
        self.cache.clear()
        pool, locks, self._pool, self._locks = self._pool, self._locks, None, None
        if locks is not None:
            await locks.close()
        if pool is not None:
            await pool.close()

    @contextlib.contextmanager
    def _mapped(
        self, message: str = "the session store could not be read or written"
    ) -> Iterator[None]:
        """Every psycopg error as a StoreError (unreachable: StoreUnavailableError)."""
        try:
            yield
        except psycopg.Error as exc:
            detail = f"PostgreSQL {self}: {type(exc).__name__}: {exc}"
            if unreachable(exc):
                raise StoreUnavailableError(
                    "the session store (PostgreSQL) cannot be reached; try again later",
                    detail=detail,
                ) from exc
            raise StoreError(message, detail=detail) from exc

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection for the block (errors mapped): the one way in."""
        if self._pool is None:
            raise StoreError("the session store is not open")
        with self._mapped():
            async with self._pool.connection() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def turn_lock(self, owner: str, session_id: str, timeout: float) -> AsyncIterator[None]:
        """Hold the session's advisory lock for the block (a turn), on a connection of the
        lock pool; wait at most ``timeout`` seconds (then SessionBusyError). Released on
        every path: unlocked, or the connection closed when its state is unsure."""
        if self._locks is None:
            raise StoreError("the session store is not open")
        pool = self._locks
        key = lock_key("turn", owner, session_id)
        deadline = asyncio.get_running_loop().time() + timeout
        with self._mapped():
            conn = await pool.getconn(self.connect_wait)
        clean = False
        try:
            with self._mapped():
                left = deadline - asyncio.get_running_loop().time()
                got = await advisory_lock(conn, key, left)
            clean = True
            if not got:
                raise busy(session_id, timeout)
            clean = False
            try:
                yield
            finally:
                with contextlib.suppress(psycopg.Error):  # else closing the connection unlocks
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                    clean = True
        finally:
            if not clean:  # cancelled or failed mid-call: the server ends the session's locks
                with contextlib.suppress(Exception):
                    await conn.cancel_safe(timeout=2.0)
                await conn.close()
            await pool.putconn(conn)

    # --- queries ---

    async def get(self, owner: str, session_id: str, last: int | None = None) -> Session | None:
        async with self.connection() as conn:
            return await self._get(conn, owner, session_id, last)

    async def _get(
        self, conn: Connection, owner: str, session_id: str, last: int | None
    ) -> Session | None:
        cur = await conn.execute(_HEADER + "WHERE owner = %s AND id = %s", (owner, session_id))
        head = await cur.fetchone()
        if head is None:
            self.cache.drop(owner, session_id)
            return None
        if last is not None:
            cached = self.cache.get(owner, session_id, last, head[4])
            if cached is not None:
                return cached
        # the header again with the messages: one statement, one snapshot, one version
        cur = await conn.execute(
            "SELECT s.id, s.system_prompt, s.created_at, s.updated_at, s.version, "
            "m.seq, m.message, m.model, m.created_at FROM sessions s LEFT JOIN LATERAL "
            "(SELECT seq, message, model, created_at FROM messages "
            "WHERE owner = s.owner AND session_id = s.id ORDER BY seq DESC LIMIT %s) m ON true "
            "WHERE s.owner = %s AND s.id = %s",
            (last, owner, session_id),
        )
        rows = await cur.fetchall()
        if not rows:
            return None  # deleted in between
        sid, prompt, created, updated, version = rows[0][:5]
        msgs = [r[5:] for r in reversed(rows) if r[5] is not None]
        session = Session(
            sid,
            prompt,
            created,
            updated,
            tuple(StoredMessage(json.loads(m), model, t) for _, m, model, t in msgs),
            owner,
            msgs[0][0] if msgs else 0,  # seq counts from 0 without gaps
        )
        if last is not None:  # a turn's window (a full read is an export: not kept)
            self.cache.put(session, [cost(len(m)) for _, m, _, _ in msgs], last, version)
        return session

    async def append(
        self,
        owner: str,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        model: str | None,
        system_prompt: str,
        rewind: int | None = None,
        limits: Limits | None = None,
    ) -> None:
        """As SQLite's; the bounds are checked under the session's row lock (and, for a
        new session, its owner's advisory lock), so nodes writing at once keep them."""
        limits = limits or Limits()
        now = time.time()
        texts = [json.dumps(m) for m in messages]
        models = [model if m.get("role") == "assistant" else None for m in messages]
        key = (owner, session_id)
        async with self.connection() as conn, conn.transaction():
            before = await self._lock_session(conn, key, limits)
            cur = await conn.execute(
                "SELECT MAX(seq) + 1 FROM messages WHERE owner = %s AND session_id = %s", key
            )
            stored = (await cur.fetchone() or (None,))[0]
            limits.check_messages(session_id, stored, len(messages), rewind)
            cur = await conn.execute(
                "INSERT INTO sessions (owner, id, system_prompt, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (owner, id) DO UPDATE SET "
                "system_prompt = excluded.system_prompt, updated_at = excluded.updated_at, "
                "version = nextval('session_versions') RETURNING version",
                (owner, session_id, system_prompt, now, now),
            )
            (after,) = await cur.fetchone() or (0,)
            if rewind is not None:
                await conn.execute(
                    "DELETE FROM messages WHERE owner = %s AND session_id = %s AND seq >= %s",
                    (owner, session_id, rewind),
                )
                stored = min(stored or 0, rewind)
            first = stored or 0
            async with conn.cursor() as c:
                await c.executemany(
                    "INSERT INTO messages (owner, session_id, seq, role, message, model, "
                    "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    [
                        (owner, session_id, first + i, str(m.get("role")), text, mm, now)
                        for i, (m, text, mm) in enumerate(zip(messages, texts, models, strict=True))
                    ],
                )
        # committed: the cache gets what a read would decode (JSON's types, own objects)
        if rewind is not None:
            self.cache.drop(owner, session_id)  # its window ends with what was deleted
            return
        stored_messages = [
            StoredMessage(json.loads(t), mm, now) for t, mm in zip(texts, models, strict=True)
        ]
        self.cache.appended(
            key,
            (system_prompt, now),
            first,
            stored_messages,
            [cost(len(t)) for t in texts],
            (-1 if before is None else before, after),
        )

    @staticmethod
    async def _lock_session(conn: Connection, key: tuple[str, str], limits: Limits) -> int | None:
        """Lock the session's row for the transaction; a new one is created under its
        owner's advisory lock, past which the owner's session bound is checked. Returns
        the session's version before (None: new)."""
        select = "SELECT version FROM sessions WHERE owner = %s AND id = %s FOR UPDATE"
        row = await (await conn.execute(select, key)).fetchone()
        if row is not None:
            return int(row[0])
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("owner", key[0]),))
        row = await (await conn.execute(select, key)).fetchone()  # created meanwhile?
        if row is not None:
            return int(row[0])
        if limits.sessions:
            cur = await conn.execute(
                "SELECT COUNT(*) FROM sessions WHERE owner = %s " + NOT_A_CHAIN, key[:1]
            )
            (owned,) = await cur.fetchone() or (0,)
            if owned >= limits.sessions:
                raise SessionLimitError.reached(limits.sessions)
        return None

    async def list(self, owner: str) -> list[SessionSummary]:
        found = await self.page(owner, None)
        return [] if found is None else found.sessions

    async def page(self, owner: str, limit: int | None, after: str | None = None) -> Page | None:
        want = None if limit is None else limit + 1  # one more says whether more follow
        newest = "ORDER BY s.updated_at DESC, s.id LIMIT %s"
        async with self.connection() as conn:
            if after is None:
                cur = await conn.execute(_SUMMARIES + newest, (owner, want))
                rows = await cur.fetchall()
            else:
                cur = await conn.execute(
                    "SELECT updated_at FROM sessions WHERE owner = %s AND id = %s", (owner, after)
                )
                mark = await cur.fetchone()
                if mark is None:
                    return None
                cur = await conn.execute(  # its ties first (same time, later ids), then older
                    _SUMMARIES + "AND s.updated_at = %s AND s.id > %s ORDER BY s.id LIMIT %s",
                    (owner, mark[0], after, want),
                )
                rows = await cur.fetchall()
                if want is None or len(rows) < want:
                    rest = None if want is None else want - len(rows)
                    cur = await conn.execute(
                        _SUMMARIES + "AND s.updated_at < %s " + newest, (owner, mark[0], rest)
                    )
                    rows += await cur.fetchall()
        more = limit is not None and len(rows) > limit
        return Page([SessionSummary(*r) for r in rows[:limit]], more)

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with self.connection() as conn:
            row = await (await conn.execute(sql, params)).fetchone()
        return None if row is None else row[0]

    async def owned(self, owner: str) -> int:
        return int(
            await self._one(
                "SELECT COUNT(*) FROM sessions WHERE owner = %s " + NOT_A_CHAIN, (owner,)
            )
        )

    async def unused_since(self, cutoff: float) -> tuple[tuple[str, str], ...]:
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT owner, id FROM sessions WHERE updated_at < %s", (cutoff,)
            )
            rows = await cur.fetchall()
        return tuple((str(o), str(i)) for o, i in rows)

    async def prompt_use(self) -> dict[str, int]:
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT system_prompt, COUNT(*) FROM sessions WHERE system_prompt != '' "
                "GROUP BY system_prompt"
            )
            rows = await cur.fetchall()
        return {str(name): int(n) for name, n in rows}

    async def count(self) -> int:
        return int(await self._one("SELECT COUNT(*) FROM sessions"))

    async def most_recent(self, last: int | None = None) -> Session | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT owner, id FROM sessions ORDER BY updated_at DESC LIMIT 1"
            )
            row = await cur.fetchone()
            return None if row is None else await self._get(conn, row[0], row[1], last)

    async def delete(self, owner: str, session_id: str, unused_before: float | None = None) -> bool:
        sql = "DELETE FROM sessions WHERE owner = %s AND id = %s"
        params: tuple[Any, ...] = (owner, session_id)
        if unused_before is not None:
            sql, params = sql + " AND updated_at < %s", (*params, unused_before)
        async with self.connection() as conn:
            cur = await conn.execute(sql, params)
        self.cache.drop(owner, session_id)
        return cur.rowcount > 0
