"""The node registry in PostgreSQL: who is in the cluster, what each has loaded, claims.

Each node upserts its row in ``hotmodel_nodes`` every ``[cluster]
heartbeat_seconds`` (its URL and :class:`NodeState`), stamped by PostgreSQL's
clock (``now()``), so nodes' clocks never need to agree. A node whose last
beat is older than ``dead_after_seconds`` is out: nothing is placed on it.
A node that stops cleanly deletes its row.

After each beat the node reads every row once; requests are placed on that
snapshot (:attr:`Registry.nodes`), never with a query per request. When
PostgreSQL cannot be reached the node keeps serving what it has loaded: the
snapshot ages, and once it is older than the deadline no other node counts
as alive (every request is served here).

``hotmodel_claims`` holds, per model, the node chosen to load it and until
when the choice stands (a load's deadline). :meth:`Registry.claim` reads and
writes it under a transaction-scoped advisory lock on the model's name, so
the requests of a burst that arrive at several nodes at once agree on one
node: the model is loaded once.

Every psycopg error becomes a :class:`~hotmodel.errors.ClusterError` in
:meth:`Registry.db`, the one place the registry enters PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg_pool import AsyncConnectionPool

from hotmodel.cluster.placement import Node, NodeState
from hotmodel.errors import ClusterError, detail_of

log = logging.getLogger("hotmodel.cluster")

SCHEMA_LOCK = 0x686F746D  # "hotm": one node at a time creates the tables
SCHEMA = """
CREATE TABLE IF NOT EXISTS hotmodel_nodes (
    id          text PRIMARY KEY,
    url         text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    beat_at     timestamptz NOT NULL DEFAULT now(),
    state       jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS hotmodel_claims (
    model  text PRIMARY KEY,
    node   text NOT NULL,
    until  timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS hotmodel_kv (
    node        text NOT NULL,
    file        text NOT NULL,
    model       text NOT NULL,
    owner       text NOT NULL,
    session_id  text NOT NULL,
    portable    jsonb NOT NULL,
    meta        jsonb NOT NULL,
    created     float8 NOT NULL,
    PRIMARY KEY (node, file)
);
CREATE INDEX IF NOT EXISTS hotmodel_kv_by_session ON hotmodel_kv (model, owner, session_id);
"""
_NODES = (
    "SELECT id, url, state, EXTRACT(EPOCH FROM now() - beat_at)::float8, "
    "EXTRACT(EPOCH FROM started_at)::float8 FROM hotmodel_nodes ORDER BY id"
)
CONNECT_S = 5.0  # a pool connection is waited for at most this long


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: str
    url: str  # how other nodes reach this one
    heartbeat_s: float
    dead_after_s: float


class Registry:
    """This node's row in the registry and its view of the others. ``async with``."""

    def __init__(
        self, store_url: str, me: Identity, state: Callable[[], Awaitable[NodeState]]
    ) -> None:
        self.me = me
        self._url = store_url
        self._state = state
        self._pool = AsyncConnectionPool(
            store_url, min_size=1, max_size=4, open=False, timeout=CONNECT_S
        )
        self.nodes: tuple[Node, ...] = ()
        self.read_at = 0.0  # monotonic time of the last good read (0: never)
        self.error: str | None = None  # the last failure to beat or read, until one works
        self._poked = asyncio.Event()

    async def __aenter__(self) -> Registry:
        try:  # one plain connection first: a server that is down fails at once, clearly
            check = await psycopg.AsyncConnection.connect(self._url, connect_timeout=int(CONNECT_S))
            await check.close()
            await self._pool.open(wait=True, timeout=CONNECT_S * 2)
        except (psycopg.Error, TimeoutError) as exc:
            await self._pool.close()
            raise ClusterError(
                "the cluster's PostgreSQL cannot be reached", detail=detail_of(exc)
            ) from exc
        try:
            async with self.db() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                await conn.execute(SCHEMA)
            await self.beat()
        except BaseException:
            await self._pool.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            async with self.db() as conn:
                await conn.execute("DELETE FROM hotmodel_nodes WHERE id = %s", (self.me.node_id,))
        except ClusterError as err:
            log.warning("could not leave the cluster registry: %s", err)
        finally:
            await self._pool.close()

    @contextlib.asynccontextmanager
    async def db(self) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
        try:
            async with self._pool.connection() as conn:
                yield conn
        except (psycopg.Error, TimeoutError) as exc:  # the pool's wait is a PoolTimeout
            raise ClusterError(
                "the cluster's PostgreSQL cannot be used", detail=detail_of(exc)
            ) from exc

    def alive(self) -> list[Node]:
        """The snapshot's live nodes; none once the snapshot itself is older than the
        deadline (PostgreSQL unreachable: this node serves what it has on its own)."""
        if time.monotonic() - self.read_at > self.me.dead_after_s:
            return []
        return [n for n in self.nodes if n.alive]

    def view(self) -> tuple[Node, ...]:
        """The snapshot as placement sees it: once the snapshot itself is older than the
        deadline, every other node shows as out (this one is alive: it is answering)."""
        if time.monotonic() - self.read_at <= self.me.dead_after_s:
            return self.nodes
        return tuple(dataclasses.replace(n, alive=n.id == self.me.node_id) for n in self.nodes)

    async def beat(self) -> None:
        """Write this node's row, then read everyone's (the snapshot)."""
        state = await self._state()
        async with self.db() as conn:
            await conn.execute(
                "INSERT INTO hotmodel_nodes (id, url, state) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET url = excluded.url, state = excluded.state, "
                "beat_at = now()",
                (self.me.node_id, self.me.url, json.dumps(state.to_json())),
            )
            await self._read(conn)

    async def refresh(self) -> tuple[Node, ...]:
        async with self.db() as conn:
            await self._read(conn)
        return self.nodes

    async def _read(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        rows = await (await conn.execute(_NODES)).fetchall()
        self.nodes = tuple(self._node(row) for row in rows)
        self.read_at = time.monotonic()
        self.error = None

    def _node(self, row: Sequence[object]) -> Node:
        node_id, url, raw, age, started = row
        state = NodeState.from_json(raw if isinstance(raw, dict) else {})
        age_s = float(age) if isinstance(age, (int, float)) else float("inf")
        return Node(
            id=str(node_id),
            url=str(url),
            state=state,
            age_s=age_s,
            alive=age_s < self.me.dead_after_s,
            started_at=float(started) if isinstance(started, (int, float)) else 0.0,
        )

    def poke(self, *_: object) -> None:
        """Something this node tells the others changed (a switch ended): beat now, so
        the others place requests on what is loaded, not on what was."""
        self._poked.set()

    async def run(self) -> None:
        """Beat until cancelled; a failure is logged once and retried at the next beat."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self.me.heartbeat_s)
            self._poked.clear()
            try:
                await self.beat()
            except ClusterError as err:
                if self.error is None:
                    log.warning("cluster heartbeat failed (serving on our own): %s", err)
                self.error = str(err)

    async def claim(
        self, model: str, choose: Callable[[Sequence[Node]], str], hold_s: float
    ) -> str:
        """The node that loads ``model``: the standing claim's, when its node is alive,
        else ``choose(live nodes)``'s, claimed for ``hold_s`` seconds. Under an advisory
        lock on the model: concurrent claims, on any node, get the same answer."""
        async with self.db() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("claim:" + model,))
            await self._read(conn)
            live = {n.id for n in self.nodes if n.alive}
            row = await (
                await conn.execute(
                    "SELECT node FROM hotmodel_claims WHERE model = %s AND until > now()",
                    (model,),
                )
            ).fetchone()
            if row is not None and str(row[0]) in live:
                return str(row[0])
            chosen = choose([n for n in self.nodes if n.alive])
            await conn.execute(
                "INSERT INTO hotmodel_claims (model, node, until) "
                "VALUES (%s, %s, now() + make_interval(secs => %s)) "
                "ON CONFLICT (model) DO UPDATE SET node = excluded.node, until = excluded.until",
                (model, chosen, hold_s),
            )
            return chosen
