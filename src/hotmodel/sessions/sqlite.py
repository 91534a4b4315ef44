"""The embedded session store: SQLite in WAL mode, schema versioned with migrations.

A session is an id, the name of its system prompt and its ordered messages
(each the OpenAI message object as sent or received, the model that produced
an assistant turn, and the time). The store never shortens a session:
bounds apply only to what is sent to a model.

All SQLite work runs on one dedicated thread (SQLite connections belong to
the thread that made them); the async methods hand work to it, so the event
loop never waits on disk. Every ``sqlite3.Error`` becomes a :class:`StoreError`
in :meth:`SqliteStore._call`, the one place the store is entered. A session
is created by its first stored turns (:meth:`SqliteStore.append`), never by a
read, so a request that is refused leaves no trace. The last messages of recently
used sessions are also kept in memory (:mod:`hotmodel.sessions.cache`), so a
turn's read costs the same at any history length and needs no query.
One process writes the file: a turn's order needs no lock beyond the
in-process one (:meth:`SqliteStore.turn_lock` holds nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from hotmodel.errors import SessionLimitError, StoreError
from hotmodel.sessions.cache import WindowCache, cost
from hotmodel.sessions.records import (
    NOT_A_CHAIN,
    Limits,
    Page,
    Session,
    SessionSummary,
    StoredMessage,
)
from hotmodel.sessions.schema import MIGRATIONS, SCHEMA_VERSION
from hotmodel.sessions.sqlite_responses import SqliteResponses

_T = TypeVar("_T")

# One owner's sessions with their message counts (seq counts from 0 without gaps: the
# count is the last seq + 1, read from the primary key, not counted row by row).
_SUMMARIES = (
    "SELECT s.id, s.system_prompt, s.created_at, s.updated_at, "
    "(SELECT COALESCE(MAX(m.seq) + 1, 0) FROM messages m "
    "WHERE m.owner = s.owner AND m.session_id = s.id) "
    "FROM sessions s WHERE s.owner = ? "
)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; returns the version found before."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"the session store has schema version {found}, newer than this "
            f"hotmodel knows ({SCHEMA_VERSION}); upgrade hotmodel"
        )
    for version in range(found, SCHEMA_VERSION):
        # one transaction per step: a failed migration leaves the previous version
        conn.executescript(
            f"BEGIN;\n{MIGRATIONS[version]}\nPRAGMA user_version = {version + 1};\nCOMMIT;"
        )
    return found


class SqliteStore:
    """Sessions in one SQLite file. Open with ``async with`` (or open()/close())."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self.cache = WindowCache()
        self._version = -1  # PRAGMA data_version when the cache was last known valid
        self.responses = SqliteResponses(self)

    def __str__(self) -> str:
        return str(self.path)

    @contextlib.asynccontextmanager
    async def turn_lock(self, owner: str, session_id: str, timeout: float) -> AsyncIterator[None]:
        """Nothing beyond the in-process lock: one process writes the file."""
        yield

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-store")
        try:
            await self._call(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn)
        except sqlite3.Error as exc:
            raise StoreError(
                "the session store could not be opened", detail=f"{self.path}: {exc}"
            ) from exc
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._call(self._close)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _close(self) -> None:
        self.cache.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _call(self, fn: Callable[[], _T]) -> _T:
        if self._executor is None:
            raise StoreError("the session store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreError(  # the path is for the server log only
                "the session store could not be read or written",
                detail=f"the SQLite file {self.path} failed: {exc}",
            ) from exc

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(connection)`` on the store's thread (errors as :meth:`_call`'s): what a
        module beside this one keeps in the same file (sessions/responses.py)."""
        return await self._call(lambda: fn(self._db()))

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the session store is not open")
        return self._conn

    def _fresh(self, db: sqlite3.Connection) -> None:
        """Empty the cache if another connection committed since the last look (a tool or
        a second process writing the file): only this connection's writes are cached."""
        (version,) = db.execute("PRAGMA data_version").fetchone()
        if version != self._version:
            self.cache.clear()
            self._version = version

    # --- queries (each runs on the store's thread) ---

    async def get(self, owner: str, session_id: str, last: int | None = None) -> Session | None:
        """The session; with ``last``, only its last ``last`` messages are read (``offset``
        says how many came before), so a turn costs the same at any history length."""
        return await self._call(lambda: self._get(owner, session_id, last))

    def _get(self, owner: str, session_id: str, last: int | None = None) -> Session | None:
        db = self._db()
        self._fresh(db)
        if last is not None:
            cached = self.cache.get(owner, session_id, last)
            if cached is not None:
                return cached
        row = db.execute(
            "SELECT id, system_prompt, created_at, updated_at FROM sessions "
            "WHERE owner = ? AND id = ?",
            (owner, session_id),
        ).fetchone()
        if row is None:
            return None
        msgs = db.execute(
            "SELECT seq, message, model, created_at FROM messages "
            "WHERE owner = ? AND session_id = ? ORDER BY seq DESC LIMIT ?",
            (owner, session_id, -1 if last is None else last),
        ).fetchall()
        msgs.reverse()
        session = Session(
            row[0],
            row[1],
            row[2],
            row[3],
            tuple(StoredMessage(json.loads(m), model, t) for _, m, model, t in msgs),
            owner,
            msgs[0][0] if msgs else 0,  # seq counts from 0 without gaps
        )
        if last is not None:  # a turn's window (a full read is an export: not kept)
            self.cache.put(session, [cost(len(m)) for _, m, _, _ in msgs], last)
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
        """Append turns atomically, creating the session if it is new; ``model`` is
        recorded on assistant turns, ``system_prompt`` on the session. With ``rewind``,
        the stored messages from that seq on are deleted first, in the same transaction
        (a client's resend that departs from the stored history replaces its end).
        Past ``limits`` nothing is written (:class:`SessionLimitError`,
        :class:`SessionFullError`): checked under the write lock, so two new sessions
        at once cannot both take the last place."""
        await self._call(
            lambda: self._append(
                owner, session_id, messages, model, system_prompt, rewind, limits or Limits()
            )
        )

    def _append(
        self,
        owner: str,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        model: str | None,
        system_prompt: str,
        rewind: int | None,
        limits: Limits,
    ) -> None:
        db = self._db()
        now = time.time()
        texts = [json.dumps(m) for m in messages]
        with db:
            db.execute("BEGIN IMMEDIATE")
            self._fresh(db)  # under the write lock: no other commit can come in between
            self._check_room(db, (owner, session_id), len(messages), rewind, limits)
            db.execute(
                "INSERT INTO sessions (owner, id, system_prompt, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(owner, id) DO UPDATE SET "
                "system_prompt = excluded.system_prompt, updated_at = excluded.updated_at",
                (owner, session_id, system_prompt, now, now),
            )
            if rewind is not None:
                db.execute(
                    "DELETE FROM messages WHERE owner = ? AND session_id = ? AND seq >= ?",
                    (owner, session_id, rewind),
                )
                self.cache.drop(owner, session_id)  # its window ends with what was deleted
            (last,) = db.execute(
                "SELECT COALESCE(MAX(seq), -1) FROM messages WHERE owner = ? AND session_id = ?",
                (owner, session_id),
            ).fetchone()
            models = [model if m.get("role") == "assistant" else None for m in messages]
            db.executemany(
                "INSERT INTO messages (owner, session_id, seq, role, message, model, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (owner, session_id, last + 1 + i, str(m.get("role")), text, mm, now)
                    for i, (m, text, mm) in enumerate(zip(messages, texts, models, strict=True))
                ],
            )
        # committed: the cache gets what a read would decode (JSON's types, own objects)
        stored = [
            StoredMessage(json.loads(t), mm, now) for t, mm in zip(texts, models, strict=True)
        ]
        self.cache.appended(
            (owner, session_id),
            (system_prompt, now),
            last + 1,
            stored,
            [cost(len(t)) for t in texts],
        )

    @staticmethod
    def _check_room(
        db: sqlite3.Connection,
        key: tuple[str, str],
        adding: int,
        rewind: int | None,
        limits: Limits,
    ) -> None:
        """Raise if appending ``adding`` messages (after ``rewind``) passes ``limits``."""
        (stored,) = db.execute(
            "SELECT MAX(seq) + 1 FROM messages WHERE owner = ? AND session_id = ?", key
        ).fetchone()
        if limits.sessions and stored is None:
            found = db.execute("SELECT 1 FROM sessions WHERE owner = ? AND id = ?", key).fetchone()
            (owned,) = db.execute(
                "SELECT COUNT(*) FROM sessions WHERE owner = ? " + NOT_A_CHAIN, key[:1]
            ).fetchone()
            if found is None and owned >= limits.sessions:  # a new session: is there room?
                raise SessionLimitError.reached(limits.sessions)
        limits.check_messages(key[1], stored, adding, rewind)

    async def list(self, owner: str) -> list[SessionSummary]:
        """Every session of ``owner``, most recently used first."""
        found = await self.page(owner, None)
        return [] if found is None else found.sessions

    async def page(self, owner: str, limit: int | None, after: str | None = None) -> Page | None:
        """Up to ``limit`` (None: all) of ``owner``'s sessions, most recently used first
        (ties by id), from the one after the session ``after``; None when ``after`` is not
        one of ``owner``'s sessions. Each query is a range of ``sessions_by_owner_use``."""
        return await self._call(lambda: self._page(owner, limit, after))

    def _page(self, owner: str, limit: int | None, after: str | None) -> Page | None:
        db = self._db()
        want = -1 if limit is None else limit + 1  # one more says whether more follow
        newest = "ORDER BY s.updated_at DESC, s.id LIMIT ?"
        if after is None:
            rows = db.execute(_SUMMARIES + newest, (owner, want)).fetchall()
        else:
            mark = db.execute(
                "SELECT updated_at FROM sessions WHERE owner = ? AND id = ?", (owner, after)
            ).fetchone()
            if mark is None:
                return None
            rows = db.execute(  # its ties first (same time, later ids), then older ones
                _SUMMARIES + "AND s.updated_at = ? AND s.id > ? ORDER BY s.id LIMIT ?",
                (owner, mark[0], after, want),
            ).fetchall()
            if want < 0 or len(rows) < want:
                rest = -1 if want < 0 else want - len(rows)
                rows += db.execute(
                    _SUMMARIES + "AND s.updated_at < ? " + newest, (owner, mark[0], rest)
                ).fetchall()
        more = limit is not None and len(rows) > limit
        return Page([SessionSummary(*r) for r in rows[:limit]], more)

    async def owned(self, owner: str) -> int:
        """How many sessions ``owner`` has."""

        def run() -> int:
            db = self._db()
            (n,) = db.execute(
                "SELECT COUNT(*) FROM sessions WHERE owner = ? " + NOT_A_CHAIN, (owner,)
            ).fetchone()
            return int(n)

        return await self._call(run)

    async def unused_since(self, cutoff: float) -> tuple[tuple[str, str], ...]:
        """(owner, id) of every session last used before ``cutoff`` (a time.time())."""

        def run() -> tuple[tuple[str, str], ...]:
            rows = (
                self._db()
                .execute("SELECT owner, id FROM sessions WHERE updated_at < ?", (cutoff,))
                .fetchall()
            )
            return tuple((str(o), str(i)) for o, i in rows)

        return await self._call(run)

    async def prompt_use(self) -> dict[str, int]:
        """How many sessions (of every owner) use each system prompt, by name."""

        def run() -> dict[str, int]:
            rows = self._db().execute(
                "SELECT system_prompt, COUNT(*) FROM sessions WHERE system_prompt != '' "
                "GROUP BY system_prompt"
            )
            return {str(name): int(n) for name, n in rows}

        return await self._call(run)

    async def count(self) -> int:
        """How many sessions the store holds (every owner's): a metric, read at scrape."""

        def run() -> int:
            (n,) = self._db().execute("SELECT COUNT(*) FROM sessions").fetchone()
            return int(n)

        return await self._call(run)

    async def most_recent(self, last: int | None = None) -> Session | None:
        """The most recently used session of any owner (what a new model is primed with)."""

        def run() -> Session | None:
            row = (
                self._db()
                .execute("SELECT owner, id FROM sessions ORDER BY updated_at DESC LIMIT 1")
                .fetchone()
            )
            return None if row is None else self._get(row[0], row[1], last)

        return await self._call(run)

    async def delete(self, owner: str, session_id: str, unused_before: float | None = None) -> bool:
        """Delete the session (its messages go with it); with ``unused_before``, only if it
        was last used before that time (retention: not one used meanwhile)."""

        def run() -> bool:
            cur = self._db().execute(
                "DELETE FROM sessions WHERE owner = ? AND id = ? AND updated_at < ?",
                (owner, session_id, math.inf if unused_before is None else unused_before),
            )
            self.cache.drop(owner, session_id)
            return cur.rowcount > 0

        return await self._call(run)
