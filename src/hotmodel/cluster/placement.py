"""Where a request for a model is served in a cluster: pure decisions over the registry.

A node serves a request itself when it has the model loaded (or is loading
it). Otherwise, when another live node has it loaded, the request goes there
(the one with the fewest requests in flight and waiting for that model), else
to a node that is loading it now. Only when no node has
it loaded is one node switched to it: :func:`choose_loader` picks it by the
scheduler's rules across nodes (an idle node first, then the fewest
requests waiting, then the most free GPU memory), and the registry claims it
under a PostgreSQL advisory lock so that a burst loads the model once, on one
node (:meth:`hotmodel.cluster.registry.Registry.claim`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class NodeState:
    """What a node tells the others at each heartbeat."""

    presets: tuple[str, ...] = ()
    loaded: tuple[str, ...] = ()  # the active model and the loaded residents
    active: str | None = None
    inflight: Mapping[str, int] = field(default_factory=dict)  # per model, admitted
    queued: Mapping[str, int] = field(default_factory=dict)  # per model, waiting for a load
    free_mib: int | None = None  # free GPU memory; None: unknown (no probe)
    loading: str | None = None  # the model a switch running now brings in

    def to_json(self) -> dict[str, Any]:
        return {
            "presets": list(self.presets),
            "loaded": list(self.loaded),
            "active": self.active,
            "loading": self.loading,
            "in_flight": dict(self.inflight),
            "queued": dict(self.queued),
            "free_gpu_mib": self.free_mib,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> NodeState:
        def counts(value: object) -> dict[str, int]:
            if not isinstance(value, dict):
                return {}
            return {str(k): int(v) for k, v in value.items() if isinstance(v, int)}

        def names(value: object) -> tuple[str, ...]:
            return tuple(str(v) for v in value) if isinstance(value, list) else ()

        active, free, loading = raw.get("active"), raw.get("free_gpu_mib"), raw.get("loading")
        return cls(
            presets=names(raw.get("presets")),
            loaded=names(raw.get("loaded")),
            active=active if isinstance(active, str) else None,
            inflight=counts(raw.get("in_flight")),
            queued=counts(raw.get("queued")),
            free_mib=free if isinstance(free, int) else None,
            loading=loading if isinstance(loading, str) else None,
        )

    @property
    def busy(self) -> int:
        """Requests in flight or waiting, every model's."""
        return sum(self.inflight.values()) + sum(self.queued.values())


@dataclass(frozen=True, slots=True)
class Node:
    """One registered node as last read from the registry."""

    id: str
    url: str
    state: NodeState
    age_s: float  # seconds since its last heartbeat, by PostgreSQL's clock
    alive: bool  # it beat within [cluster] dead_after_seconds
    started_at: float = 0.0

    def load_of(self, model: str) -> int:
        return self.state.inflight.get(model, 0) + self.state.queued.get(model, 0)

    def to_json(self, here: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "self": self.id == here,
            "alive": self.alive,
            "heartbeat_age_seconds": round(self.age_s, 3),
            "started_at": self.started_at,
            **self.state.to_json(),
        }


class Where(enum.Enum):
    HERE = "here"  # this node serves it (it has the model, or nothing better is known)
    FORWARD = "forward"  # another node has it loaded
    CLAIM = "claim"  # no node has it: one must load it (Registry.claim decides which)


@dataclass(frozen=True, slots=True)
class Placement:
    where: Where
    node: Node | None = None  # FORWARD: where to


def place(
    model: str,
    here: str,
    loaded_here: bool,
    nodes: Sequence[Node],
    skip: frozenset[str] = frozenset(),
) -> Placement:
    """Where a request for ``model`` (a preset name) goes: ``loaded_here`` is this node's
    own, current answer (not its last heartbeat's); ``skip``: nodes that just failed."""
    if loaded_here:
        return Placement(Where.HERE)
    holders = [
        n
        for n in nodes
        if n.alive and n.id != here and n.id not in skip and model in n.state.loaded
    ]
    if holders:
        return Placement(Where.FORWARD, min(holders, key=lambda n: (n.load_of(model), n.id)))
    coming = [  # a node switching to it now: its requests wait there, no second load
        n
        for n in nodes
        if n.alive and n.id != here and n.id not in skip and n.state.loading == model
    ]
    if coming:
        return Placement(Where.FORWARD, min(coming, key=lambda n: (n.load_of(model), n.id)))
    return Placement(Where.CLAIM)


def choose_loader(model: str, here: str, nodes: Sequence[Node], need_mib: int | None = None) -> str:
    """The node to switch to ``model``: among live nodes that have it as a preset (and,
    when some can tell, whose free GPU memory fits its ``need_mib``), an idle one first,
    then the fewest requests waiting, then the most free GPU memory; on a tie this node
    (no forward), then by id. This node when none qualifies."""
    candidates = [n for n in nodes if n.alive and model in n.state.presets]
    if need_mib is not None:
        fit = [n for n in candidates if n.state.free_mib is None or n.state.free_mib >= need_mib]
        candidates = fit or candidates  # none fits: the usual rules pick the least bad
    if not candidates:
        return here

    def rank(n: Node) -> tuple[bool, int, int, bool, str]:
        free = n.state.free_mib if n.state.free_mib is not None else -1
        return (n.state.busy > 0, sum(n.state.queued.values()), -free, n.id != here, n.id)

    return min(candidates, key=rank).id
