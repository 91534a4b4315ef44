"""Joining the cluster at start: this node's identity, what it tells the others, its beat.

:func:`join` enters the registry and its heartbeat task on the runtime's exit
stack (so they end, the row deleted, on every way out) and gives the
:class:`~hotmodel.cluster.node.ClusterNode` the door asks where requests go.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

from hotmodel.cluster.kv_share import KvShare
from hotmodel.cluster.node import ClusterNode
from hotmodel.cluster.placement import NodeState
from hotmodel.cluster.registry import Identity, Registry
from hotmodel.config import ClusterConfig, Config
from hotmodel.control.controller import Controller
from hotmodel.control.fit import preset_need_mib
from hotmodel.control.gpu import GpuProbe
from hotmodel.control.scheduler import Scheduler
from hotmodel.control.snapshots import Snapshots
from hotmodel.control.traffic import TrafficGate

LOADED = "loaded"  # a resident's state when it is loaded (control/residents.py)


def identity(config: Config, cluster: ClusterConfig) -> Identity:
    """This node's id and URL: ``[cluster]``'s, else ``[server]``'s host and port (after
    ``serve --port``)."""
    host, port = config.server.host, config.server.port
    url_host = f"[{host}]" if ":" in host else host
    return Identity(
        node_id=cluster.node_id or f"{host}:{port}",
        url=(cluster.url or f"http://{url_host}:{port}").rstrip("/"),
        heartbeat_s=cluster.heartbeat_seconds,
        dead_after_s=cluster.dead_after_seconds,
    )


def loaded_models(controller: Controller) -> tuple[str, ...]:
    """The active model and the loaded residents: what this node serves without a switch."""
    resident = [n for n, state in controller.residents.status().items() if state == LOADED]
    return tuple(([controller.active] if controller.active else []) + resident)


async def join(
    stack: contextlib.AsyncExitStack,
    current: Callable[[], Config],
    controller: Controller,
    gate: TrafficGate,
    scheduler: Scheduler,
    gpu: GpuProbe,
    task: Callable[..., contextlib.AbstractAsyncContextManager[object]],
    snapshots: Snapshots | None,
) -> ClusterNode | None:
    """Enter the registry and its heartbeat on ``stack``; None when ``[cluster]`` is unset."""
    config = current()
    if config.cluster is None:
        return None

    async def state() -> NodeState:
        reading = await asyncio.to_thread(gpu.read)
        free = None if reading is None else sum(d.total_mib - d.used_mib for d in reading.devices)
        inflight = collections.Counter(t.model for t in gate.inflight() if t.model is not None)
        return NodeState(
            presets=tuple(current().presets.models),
            loaded=loaded_models(controller),
            active=controller.active,
            inflight=dict(inflight),
            queued={m: int(q["waiting"]) for m, q in scheduler.status().items()},
            free_mib=free,
            loading=controller.loading,
        )

    registry = await stack.enter_async_context(
        Registry(config.store.url, identity(config, config.cluster), state)
    )
    await stack.enter_async_context(task(registry.run(), "cluster-heartbeat"))
    controller.watch(registry.poke)  # each phase and report: what is loaded may have changed
    node = ClusterNode(
        registry,
        config.cluster.key,
        presets=lambda: tuple(current().presets.models),
        loaded_here=lambda model: model in loaded_models(controller) or model == controller.loading,
        claim_hold_s=lambda: current().switch.load_timeout_seconds,
        # its GGUF and KV cache (control/fit.py): a node whose free GPU memory is known
        # to be short of it is not chosen while another fits
        need_mib=lambda model: preset_need_mib(current().presets, model, current().router),
    )
    stack.push_async_callback(node.aclose)
    if snapshots is not None:  # the others may fetch this node's KV snapshots, and it theirs
        snapshots.share = KvShare(node)
        await snapshots.publish()
    return node
