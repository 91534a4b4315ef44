"""This node in its cluster: where a request goes, and the client that takes it there.

:class:`ClusterNode` joins the registry's snapshot to placement's pure rules
(:mod:`hotmodel.cluster.placement`): ``where(model)`` answers None (serve it
here) or the node to forward to. The forwarding itself is HTTP, in
``api/placement.py``; this holds its client and the cluster key that marks a
request as forwarded by a peer (such a request is always served where it
lands: a request is forwarded at most once).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence

from hotmodel.cluster.peer import peer_client
from hotmodel.cluster.placement import Node, Where, choose_loader, place
from hotmodel.cluster.registry import Registry
from hotmodel.errors import ClusterError

log = logging.getLogger("hotmodel.cluster")

KEY_HEADER = "x-hotmodel-cluster-key"  # a peer's forward carries the cluster key
FROM_HEADER = "x-hotmodel-forwarded-by"  # ... and the id of the node that forwarded it
NODE_HEADER = "x-hotmodel-node"  # every answer in a cluster: the node that served it


class ClusterNode:
    def __init__(
        self,
        registry: Registry,
        key: str,
        presets: Callable[[], Sequence[str]],
        loaded_here: Callable[[str], bool],
        claim_hold_s: Callable[[], float],
        need_mib: Callable[[str], int | None] = lambda model: None,
    ) -> None:
        self.registry = registry
        self.id = registry.me.node_id
        self._key = key
        self._presets = presets
        self._loaded_here = loaded_here
        self._hold_s = claim_hold_s
        self._need_mib = need_mib
        self.http = peer_client()

    async def aclose(self) -> None:
        await self.http.aclose()

    def trusts(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._key.encode())

    def peer_headers(self) -> dict[str, str]:
        return {KEY_HEADER: self._key, FROM_HEADER: self.id}

    async def where(self, model: object, skip: frozenset[str] = frozenset()) -> Node | None:
        """The node to forward a request for ``model`` to; None: serve it here (an alias,
        an unknown name, a model loaded here, one this node is chosen to load, or the
        registry out of reach)."""
        if not isinstance(model, str) or model not in self._presets():
            return None  # "active", omitted, or not a preset: this node answers as alone
        nodes = self.registry.alive()
        found = place(model, self.id, self._loaded_here(model), nodes, skip)
        if found.where is Where.HERE:
            return None
        if found.where is Where.FORWARD:
            return found.node
        try:
            chosen = await self.registry.claim(
                model,
                lambda live: choose_loader(
                    model, self.id, [n for n in live if n.id not in skip], self._need_mib(model)
                ),
                self._hold_s(),
            )
        except ClusterError as err:
            log.warning("no claim for %r (serving it here): %s", model, err)
            return None
        if chosen == self.id or chosen in skip:
            return None
        return next((n for n in self.registry.alive() if n.id == chosen), None)
