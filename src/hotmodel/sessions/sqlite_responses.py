"""The stored Responses of a SQLite store: its queries of table ``responses``.

Run on the store's one thread, in its file (:meth:`SqliteStore.run`); what they
mean is :mod:`hotmodel.sessions.responses`'s.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from hotmodel.sessions.responses import (
    COLUMNS,
    MAX_CHAIN,
    StoredResponse,
    encode,
    folded,
    from_row,
)

_T = TypeVar("_T")


class RunsSqlite(Protocol):
    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T: ...


class SqliteResponses:
    """The responses table in the store's file, on its thread (sessions/responses.py)."""

    def __init__(self, store: RunsSqlite) -> None:
        self.store = store

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        def run(db: sqlite3.Connection) -> StoredResponse | None:
            row = db.execute(
                f"SELECT {COLUMNS} FROM responses WHERE owner = ? AND id = ?",
                (owner, response_id),
            ).fetchone()
            return None if row is None else from_row(row)

        return await self.store.run(run)

    async def chain(self, owner: str, response_id: str) -> list[StoredResponse] | None:
        def run(db: sqlite3.Connection) -> list[StoredResponse] | None:
            found: list[StoredResponse] = []
            at: str | None = response_id
            while at is not None and len(found) < MAX_CHAIN:
                row = db.execute(
                    f"SELECT {COLUMNS} FROM responses WHERE owner = ? AND id = ?", (owner, at)
                ).fetchone()
                if row is None:
                    break  # a predecessor deleted outside hotmodel: the chain starts here
                found.append(from_row(row))
                at = found[-1].previous_id
            return list(reversed(found)) or None

        return await self.store.run(run)

    async def save(
        self,
        owner: str,
        response: dict[str, Any],
        previous_id: str | None,
        model: str,
        new_input: list[dict[str, Any]],
    ) -> None:
        row = (owner, str(response.get("id") or ""), previous_id, model)
        texts = (encode(new_input), encode(response), time.time())

        def run(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    f"INSERT OR REPLACE INTO responses (owner, {COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    row + texts,
                )

        await self.store.run(run)

    async def delete(self, owner: str, response_id: str) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            with db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute(
                    f"SELECT {COLUMNS} FROM responses WHERE owner = ? AND id = ?",
                    (owner, response_id),
                ).fetchone()
                if row is None:
                    return False
                gone = from_row(row)
                children = db.execute(
                    "SELECT id, input FROM responses WHERE owner = ? AND previous_id = ?",
                    (owner, response_id),
                ).fetchall()
                for child_id, raw in children:
                    db.execute(
                        "UPDATE responses SET previous_id = ?, input = ? "
                        "WHERE owner = ? AND id = ?",
                        (gone.previous_id, folded(gone, raw), owner, child_id),
                    )
                db.execute("DELETE FROM responses WHERE owner = ? AND id = ?", (owner, response_id))
                return True

        return await self.store.run(run)
