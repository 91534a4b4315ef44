"""The cluster's index of KV snapshots: which node keeps which session's snapshot.

Each node publishes the snapshots its folder keeps (``hotmodel_kv``: one row
per file, with the sidecar's fields and the snapshot's portable identity:
model file and llama-server binary by content, the KV settings) after every
save. A node asked to restore a session it has no snapshot of looks for a
live node's snapshot of that session for that model with the same portable
identity, downloads it from that node (``GET /cluster/kv/{file}`` with the
cluster key), checks its size and sha256, and restores it as its own. When
none is found, or none arrives whole, the session is replayed, as on a
single node. KV is never carried across models or across differing files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hotmodel.cluster.node import ClusterNode
from hotmodel.cluster.peer import download
from hotmodel.errors import ClusterError

KV_PATH = "/cluster/kv/"  # + a snapshot's file name: what a peer fetches


class KvShare:
    """``control.ports.SnapshotShare`` over the registry's PostgreSQL and the peers."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    async def publish(self, kept: Sequence[Mapping[str, Any]]) -> None:
        me = self.node.id
        async with self.node.registry.db() as conn, conn.transaction():
            await conn.execute("DELETE FROM hotmodel_kv WHERE node = %s", (me,))
            for meta in kept:
                fields = {k: v for k, v in meta.items() if k != "portable"}
                await conn.execute(
                    "INSERT INTO hotmodel_kv (node, file, model, owner, session_id, portable, "
                    "meta, created) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        me,
                        str(meta["file"]),
                        str(meta["model"]),
                        str(meta["owner"]),
                        str(meta["session_id"]),
                        json.dumps(meta["portable"], sort_keys=True),
                        json.dumps(fields),
                        float(meta["created"]),
                    ),
                )

    async def fetch(
        self, model: str, owner: str, session_id: str, portable: Mapping[str, str], into: Path
    ) -> dict[str, Any] | None:
        async with self.node.registry.db() as conn:
            rows = await (
                await conn.execute(
                    "SELECT node, file, meta FROM hotmodel_kv WHERE model = %s AND owner = %s "
                    "AND session_id = %s AND node <> %s AND portable = %s::jsonb "
                    "ORDER BY created DESC",
                    (model, owner, session_id, self.node.id, json.dumps(dict(portable))),
                )
            ).fetchall()
        alive = {n.id: n for n in self.node.registry.alive()}
        for node_id, file, meta in rows:
            peer = alive.get(str(node_id))
            if peer is None or not isinstance(meta, dict):
                continue
            try:
                await download(
                    self.node.http,
                    peer.url + KV_PATH + str(file),
                    list(self.node.peer_headers().items()),
                    into,
                    int(meta["size"]),
                    str(meta["sha256"]),
                )
            except ClusterError:
                continue  # gone meanwhile, or damaged: the next one, else a replay
            return {**meta, "node": peer.id}
        return None
