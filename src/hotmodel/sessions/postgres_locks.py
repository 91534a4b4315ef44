"""PostgreSQL advisory locks of the shared store, and its migrations under one.

Keys are 64-bit hashes of their parts (:func:`lock_key`): a session's turn
(``"turn", owner, id``), an owner's new sessions (``"owner", owner``), an
owner's Responses (``"responses", owner``) and the migration.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import psycopg

from hotmodel.errors import StoreError
from hotmodel.sessions.schema import PG_MIGRATIONS, PG_SCHEMA_VERSION

log = logging.getLogger(__name__)

Connection = psycopg.AsyncConnection[Any]


def lock_key(*parts: str) -> int:
    """A 64-bit advisory lock key for ``parts`` (e.g. "turn", owner, session id)."""
    digest = hashlib.blake2b("\n".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


MIGRATION_LOCK = lock_key("hotmodel", "migrate")


async def advisory_lock(conn: Connection, key: int, timeout: float) -> bool:
    """Take session advisory lock ``key`` on ``conn``, waiting at most ``timeout`` s
    (the server's ``lock_timeout``: waiters are served first come, first served)."""
    if timeout <= 0:
        row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))).fetchone()
        return bool(row and row[0])
    await conn.execute(
        "SELECT set_config('lock_timeout', %s, false)", (f"{max(1, int(timeout * 1000))}ms",)
    )
    try:
        await conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg.errors.LockNotAvailable:
        return False
    return True


async def migrate(conn: Connection) -> int:
    """Bring the schema to :data:`PG_SCHEMA_VERSION`, one transaction per step under an
    advisory lock (nodes starting together migrate once); returns the version found."""
    found: int | None = None
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")
            row = None
            if (await cur.fetchone() or (False,))[0]:
                row = await (await conn.execute("SELECT version FROM schema_version")).fetchone()
            version = 0 if row is None else int(row[0])
            if found is None:
                found = version
            if version > PG_SCHEMA_VERSION:
                raise StoreError(
                    f"the session store has schema version {version}, newer than this "
                    f"hotmodel knows ({PG_SCHEMA_VERSION}); upgrade hotmodel"
                )
            if version == PG_SCHEMA_VERSION:
                return found
            if version == 0:
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer)")
                await conn.execute("DELETE FROM schema_version")
                await conn.execute("INSERT INTO schema_version VALUES (0)")
            await conn.execute(PG_MIGRATIONS[version].encode())
            await conn.execute("UPDATE schema_version SET version = %s", (version + 1,))
            log.info("session store (PostgreSQL): schema version %d", version + 1)
