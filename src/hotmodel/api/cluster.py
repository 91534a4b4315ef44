"""The cluster's routes: ``GET /admin/cluster`` (the nodes) and ``GET /cluster/kv/{file}``
(a KV snapshot file, for a peer that restores a session this node saved).

``/cluster/kv/*`` answers only a request carrying the cluster key (403 otherwise,
404 outside a cluster), and only files this node's snapshot folder holds under
its own names (``kv-<16 hex>.bin`` with a sidecar): a name from the request is
never a path.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from hotmodel.api.errors import error_response
from hotmodel.cluster.kv_share import KV_PATH
from hotmodel.cluster.node import KEY_HEADER
from hotmodel.errors import HotModelError
from hotmodel.runtime import Services

_FILE = re.compile(r"kv-[0-9a-f]{16}\.bin")


def cluster_routes(services: Services) -> list[Route]:
    s = services

    async def nodes(request: Request) -> Response:
        """The registry's nodes, read now (the last snapshot when PostgreSQL is out of reach)."""
        node = s.cluster
        if node is None:
            return JSONResponse({"enabled": False, "self": None, "nodes": []})
        error = None
        try:
            found = await node.registry.refresh()
        except HotModelError as exc:
            found, error = node.registry.view(), exc.public
        return JSONResponse(
            {
                "enabled": True,
                "self": node.id,
                "nodes": [n.to_json(node.id) for n in found],
                "error": error or node.registry.error,
            }
        )

    async def kv_file(request: Request) -> Response:
        node, snapshots = s.cluster, s.snapshots
        if node is None or snapshots is None:
            return error_response(404, "not in a cluster", "invalid_request_error", "not_found")
        if not node.trusts(request.headers.get(KEY_HEADER, "")):
            return error_response(
                403, "wrong cluster key", "invalid_request_error", "cluster_key_invalid"
            )
        name = request.path_params["file"]
        kept = {m.file for m in snapshots.folder.metas()}
        if not _FILE.fullmatch(name) or name not in kept:
            return error_response(404, "no such snapshot", "invalid_request_error", "not_found")
        return FileResponse(snapshots.dir / name, media_type="application/octet-stream")

    return [
        Route("/admin/cluster", nodes, methods=["GET"]),
        Route(KV_PATH + "{file}", kv_file, methods=["GET"]),
    ]
