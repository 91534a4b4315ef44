"""Placement at the door: in a cluster, a request for a model another node has loaded is
forwarded there (``cluster/node.py`` decides where; this moves the bytes).

An ASGI middleware inside the key check (a client's key is checked here, then
again by the peer, whose keys are the same), around every inference route.
It reads the body (bounded like every body), looks at ``model`` and either
passes the request on here, with the body put back, or sends it to the peer
with the cluster key and relays the answer as it comes: status, headers and
body chunk by chunk, SSE included; a client that leaves stops the peer's
request. A request that carries the cluster key was forwarded by a peer and
is served here: nothing is forwarded twice. A peer that cannot be reached,
or that fails before its answer began, is skipped and the request placed
again (in the end: here), so a node that dies loses no request that has not
started answering. Every answer in a cluster says which node served it
(``x-hotmodel-node``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotmodel.api.endpoints import ANTHROPIC_PATHS, CHAT_PATH, ENDPOINTS
from hotmodel.api.errors import error_response, hotmodel_error_response, sse_error
from hotmodel.api.validate import parse_json, read_asgi_body
from hotmodel.cluster.node import FROM_HEADER, KEY_HEADER, NODE_HEADER, ClusterNode
from hotmodel.cluster.peer import PeerAnswer, send_to_peer
from hotmodel.cluster.placement import Node
from hotmodel.errors import HotModelError, PeerLostError, PeerUnreachableError

log = logging.getLogger("hotmodel.cluster")

FORWARDED = "forwarded_by"  # scope state: the peer that forwarded this request
PLACED = frozenset({CHAT_PATH, *ANTHROPIC_PATHS, *(e.path for e in ENDPOINTS)})
MAX_PEERS = 3  # peers tried for one request before it is served here
# not passed between client and peer: hop-by-hop, recomputed, or ours
_REQUEST_DROP = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
     "upgrade", KEY_HEADER, FROM_HEADER}
)  # fmt: skip
# (date, server and the request id: this node's own server sets its own)
_RESPONSE_DROP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "date", "server", "x-request-id", NODE_HEADER}
)


class Place:
    def __init__(
        self, app: ASGIApp, cluster: Callable[[], ClusterNode | None], limit: Callable[[], int]
    ) -> None:
        self.app = app
        self.cluster = cluster
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        node = self.cluster()
        if node is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _naming(send, node.id)
        headers = Headers(scope=scope)
        given = headers.get(KEY_HEADER)
        if given is not None:
            if not node.trusts(given):
                refused = error_response(
                    403, "wrong cluster key", "invalid_request_error", "cluster_key_invalid"
                )
                await refused(scope, receive, send)
                return
            scope.setdefault("state", {})[FORWARDED] = headers.get(FROM_HEADER, "")
            await self.app(scope, receive, send)  # a peer's forward: served here
            return
        if scope["method"] != "POST" or scope["path"] not in PLACED:
            await self.app(scope, receive, send)
            return
        try:
            body = await read_asgi_body(receive, headers.get("content-length", ""), self.limit())
        except HotModelError as exc:
            await hotmodel_error_response(exc)(scope, receive, send)
            return
        await self._place(node, scope, body, receive, send)

    async def _place(
        self, node: ClusterNode, scope: Scope, body: bytes, receive: Receive, send: Send
    ) -> None:
        model = _model_of(body)
        skip: frozenset[str] = frozenset()
        for _ in range(MAX_PEERS):
            peer = await node.where(model, skip)
            if peer is None:
                break
            try:
                await _forward(node, peer, scope, body, receive, send)
                return
            except PeerUnreachableError as why:
                log.warning("node %s did not answer (%s): placing the request again", peer.id, why)
                skip |= {peer.id}
        await self.app(scope, _replay(body, receive), send)


def forwarded(scope: Scope) -> bool:
    """Whether a peer forwarded this request (it is served here, whatever happens)."""
    return FORWARDED in (scope.get("state") or {})


def _model_of(body: bytes) -> object:
    try:
        payload = parse_json(body)
    except HotModelError:
        return None  # served here, where the door answers it with its 400
    return payload.get("model") if isinstance(payload, dict) else None


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` with the body that was already read given once more, first."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _naming(send: Send, node_id: str) -> Send:
    """``send`` that names this node on the answer (unless a peer's answer named its own)."""
    value = node_id.encode()

    async def named(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if not any(k.lower() == NODE_HEADER.encode() for k, _ in headers):
                headers.append((NODE_HEADER.encode(), value))
            message = {**message, "headers": headers}
        await send(message)

    return named


async def _forward(
    node: ClusterNode, peer: Node, scope: Scope, body: bytes, receive: Receive, send: Send
) -> None:
    query = scope.get("query_string", b"").decode("latin-1")
    url = peer.url + scope["path"] + (f"?{query}" if query else "")
    headers = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in scope["headers"]
        if k.decode("latin-1").lower() not in _REQUEST_DROP
    ]
    headers += list(node.peer_headers().items())
    async with send_to_peer(node.http, url, headers, body) as answer:
        kept = [
            (k, v) for k, v in answer.headers if k.decode("latin-1").lower() not in _RESPONSE_DROP
        ]
        kept = [(k, _peer_timing(v) if k.lower() == b"server-timing" else v) for k, v in kept]
        kept.append((NODE_HEADER.encode(), peer.id.encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": kept})
        await _relay(answer, receive, send)


def _peer_timing(value: bytes) -> bytes:
    """The peer's ``Server-Timing`` beside ours: its metrics named ``node_*``."""
    return b", ".join(b"node_" + part.strip() for part in value.split(b","))


async def _relay(answer: PeerAnswer, receive: Receive, send: Send) -> None:
    """The peer's body, chunk by chunk, until it ends or the client leaves."""
    async with anyio.create_task_group() as tasks:

        async def watch() -> None:  # the body is read: the next message is the client leaving
            while (await receive())["type"] != "http.disconnect":
                pass
            tasks.cancel_scope.cancel()

        tasks.start_soon(watch)
        try:
            async for chunk in answer.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except PeerLostError as exc:
            log.warning("a forwarded answer broke off: %s", exc)
            if not answer.streamed:
                raise  # the connection closes: a cut JSON body must not look whole
            message = sse_error(exc.public, "node_lost")
            await send({"type": "http.response.body", "body": message, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        tasks.cancel_scope.cancel()
