"""The stored Responses of a PostgreSQL store: its queries of table ``responses``.

On the store's pooled connections (:meth:`PostgresStore.connection`, errors
mapped there); what they mean is :mod:`hotmodel.sessions.responses`'s. A save
or a delete takes its owner's transaction advisory lock: nodes folding and
saving one owner's chain at once cannot lose an item.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Protocol

import psycopg

from hotmodel.sessions.postgres_locks import lock_key
from hotmodel.sessions.responses import (
    COLUMNS,
    MAX_CHAIN,
    StoredResponse,
    encode,
    folded,
    from_row,
)

Connection = psycopg.AsyncConnection[Any]
_SELECT = f"SELECT {COLUMNS} FROM responses WHERE owner = %s AND id = %s"


class ConnectsPostgres(Protocol):
    def connection(self) -> contextlib.AbstractAsyncContextManager[Connection]: ...


class PostgresResponses:
    def __init__(self, store: ConnectsPostgres) -> None:
        self.store = store

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        async with self.store.connection() as conn:
            row = await (await conn.execute(_SELECT, (owner, response_id))).fetchone()
        return None if row is None else from_row(row)

    async def chain(self, owner: str, response_id: str) -> list[StoredResponse] | None:
        found: list[StoredResponse] = []
        at: str | None = response_id
        async with self.store.connection() as conn, conn.transaction():  # one snapshot
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            while at is not None and len(found) < MAX_CHAIN:
                row = await (await conn.execute(_SELECT, (owner, at))).fetchone()
                if row is None:
                    break  # a predecessor deleted outside hotmodel: the chain starts here
                found.append(from_row(row))
                at = found[-1].previous_id
        return list(reversed(found)) or None

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
        async with self.store.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("responses", owner),))
            await conn.execute(
                f"INSERT INTO responses (owner, {COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (owner, id) DO UPDATE SET previous_id = excluded.previous_id, "
                "model = excluded.model, input = excluded.input, "
                "response = excluded.response, created_at = excluded.created_at",
                row + texts,
            )

    async def delete(self, owner: str, response_id: str) -> bool:
        async with self.store.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("responses", owner),))
            row = await (await conn.execute(_SELECT, (owner, response_id))).fetchone()
            if row is None:
                return False
            gone = from_row(row)
            cur = await conn.execute(
                "SELECT id, input FROM responses WHERE owner = %s AND previous_id = %s",
                (owner, response_id),
            )
            for child_id, raw in await cur.fetchall():
                await conn.execute(
                    "UPDATE responses SET previous_id = %s, input = %s "
                    "WHERE owner = %s AND id = %s",
                    (gone.previous_id, folded(gone, raw), owner, child_id),
                )
            await conn.execute(
                "DELETE FROM responses WHERE owner = %s AND id = %s", (owner, response_id)
            )
            return True
