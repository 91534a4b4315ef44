"""The ``cluster`` section: two nodes on one PostgreSQL (issue 24).

A PostgreSQL of our own (``LocalPostgres``, on loopback), and two ``hotmodel
serve`` nodes on the demo models, each with its own llama-server, state dir
and port, sharing the store and the node registry.

- ``forward``: node A with SmolLM2 loaded, node B with Gemma. A request for
  SmolLM2 sent to A is served there (local); sent to B it is forwarded to A
  (B reads the body, finds A in the registry's snapshot and relays A's answer).
  Round by round, in turn (the order rotates): a 1-token plain request, then a
  stream of ``STREAM_TOKENS`` tokens (its first byte), each to A and to B. Every
  answer's ``x-hotmodel-node`` must name A, and B must never switch.
- ``throughput``: then B switched to SmolLM2 too. N keep-alive clients send
  short requests back to back, in interleaved blocks: all to A (one node; B
  idle), or half to A and half to B (two nodes, each serving its own).
  Requests and generated tokens per second.

On one machine both nodes, both llama-servers, PostgreSQL and the clients
share the same cores: two nodes cannot double the throughput there; the
figure says what a second node costs or gains on the same CPUs, not what a
second host would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx

from bench.harness import (
    PLAIN,
    Served,
    Settings,
    client,
    hotmodel_switch,
    rotate,
    serving,
    stream_body,
    summary,
)
from bench.results import n, table
from hotmodel.cluster.postgres import temporary_postgres

KEY = "bench-cluster-key-loopback-only"
NODE_HEADER = "x-hotmodel-node"
STREAM_TOKENS = 4
ROUTES = ("local", "forwarded")  # the latency part: sent to A, sent to B (forwarded to A)
WAYS = ("one_node", "two_nodes")  # the throughput part
# the throughput part's request: 4 tokens whatever the model would say
SHORT: dict[str, Any] = {**PLAIN, "max_tokens": 4, "ignore_eos": True}
READY_S = 120.0


# --- the cluster -------------------------------------------------------------------------


def node_extra(url: str, node_id: str) -> str:
    """The config lines that make a demo ``hotmodel serve`` a node of the cluster."""
    return (
        "[switch]\nauto = true\n"  # as the cluster demo: a model no node has is loaded
        f'[store]\nurl = "{url}"\n'
        f'[cluster]\nnode_id = "{node_id}"\nkey = "{KEY}"\n'
        "heartbeat_seconds = 1\ndead_after_seconds = 5\n"
    )


def _nodes_seen(base: str) -> dict[str, list[str]]:
    """The live nodes ``base`` sees, with their loaded models."""
    with client(10) as c:
        nodes = c.get(base + "/admin/cluster").json()["nodes"]
    return {str(node["id"]): list(node["loaded"]) for node in nodes if node["alive"]}


def wait_ready(nodes: dict[str, Served], loaded: dict[str, str]) -> None:
    """Until every node sees every node alive, with ``loaded[id]`` loaded."""
    deadline = time.monotonic() + READY_S
    while True:
        views = {name: _nodes_seen(served.base_url) for name, served in nodes.items()}
        if all(
            set(seen) == set(nodes) and all(loaded[i] in seen[i] for i in nodes)
            for seen in views.values()
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster never formed: {views}")
        time.sleep(0.2)


@contextlib.contextmanager
def two_nodes(url: str, default_a: str, default_b: str) -> Iterator[tuple[Served, Served]]:
    """Node a (``default_a`` loaded) and node b (``default_b``), both formed; stopped after."""
    with (
        serving(default_a, node_extra(url, "a")) as a,
        serving(default_b, node_extra(url, "b")) as b,
    ):
        wait_ready({"a": a, "b": b}, {"a": default_a, "b": default_b})
        yield a, b


def _switches(base: str) -> int:
    with client(10) as c:
        data = c.get(base + "/admin/switches").json()["data"]
    return sum(1 for report in data if report["outcome"] == "ok")


# --- a forwarded request against a local one ----------------------------------------------


def _plain(c: httpx.Client, url: str) -> tuple[float, str]:
    """Wall milliseconds of one 1-token request, and the node that served it."""
    t0 = time.perf_counter()
    answer = c.post(url + "/v1/chat/completions", json=PLAIN)
    took = (time.perf_counter() - t0) * 1000
    answer.raise_for_status()
    return took, answer.headers.get(NODE_HEADER, "")


def _first_byte(c: httpx.Client, url: str) -> tuple[float, str]:
    """Milliseconds to a stream's first byte (the stream then read to its end), and the
    node that served it."""
    body = {**stream_body(STREAM_TOKENS), "stream": True}
    t0 = time.perf_counter()
    first: float | None = None
    with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for _ in r.iter_raw():
            if first is None:
                first = (time.perf_counter() - t0) * 1000
        node = r.headers.get(NODE_HEADER, "")
    if first is None:
        raise RuntimeError(f"an empty stream from {url}")
    return first, node


def _latency(a: Served, b: Served, rounds: int) -> dict[str, Any]:
    url = {"local": a.base_url, "forwarded": b.base_url}
    plain: dict[str, list[float]] = {r: [] for r in ROUTES}
    first: dict[str, list[float]] = {r: [] for r in ROUTES}
    served: Counter[str] = Counter()  # route -> node, e.g. "forwarded->a"
    switches_b = _switches(b.base_url)
    with client() as ca, client() as cb:
        c = {"local": ca, "forwarded": cb}
        for _ in range(5):  # every connection open, A's prompt cache warm
            for r in ROUTES:
                _plain(c[r], url[r])
                _first_byte(c[r], url[r])
        for i in range(rounds):
            for r in rotate(ROUTES, i):
                ms, node = _plain(c[r], url[r])
                plain[r].append(ms)
                served[f"{r}->{node}"] += 1
            for r in rotate(ROUTES, i + 1):
                ms, node = _first_byte(c[r], url[r])
                first[r].append(ms)
                served[f"{r}->{node}"] += 1
    if set(served) != {"local->a", "forwarded->a"}:
        raise RuntimeError(f"not every request was served by node a: {dict(served)}")
    if _switches(b.base_url) != switches_b:
        raise RuntimeError("node b switched models: it should have forwarded")
    out: dict[str, Any] = {
        "rounds": rounds,
        "stream_max_tokens": STREAM_TOKENS,
        "routes": {
            r: {"plain": summary(plain[r]), "stream_first_byte": summary(first[r])} for r in ROUTES
        },
        "served_by": dict(served),
    }
    out["added_ms"] = {
        kind: {
            stat: round(
                out["routes"]["forwarded"][kind][stat] - out["routes"]["local"][kind][stat], 3
            )
            for stat in ("p50_ms", "p99_ms", "mean_ms")
        }
        for kind in ("plain", "stream_first_byte")
    }
    # each round's forwarded request less its local one, sent right before or after it:
    # the machine's slow drift cancels out (on a busy machine, the steadier figure)
    out["added_ms_paired"] = {
        kind: summary([f - loc for f, loc in zip(times["forwarded"], times["local"], strict=True)])
        for kind, times in (("plain", plain), ("stream_first_byte", first))
    }
    return out


# --- two nodes against one ---------------------------------------------------------------


async def _worker(c: httpx.AsyncClient, url: str, deadline: float, tally: Counter[str]) -> None:
    while time.perf_counter() < deadline:
        try:
            answer = await c.post(url + "/v1/chat/completions", json=SHORT)
        except httpx.TransportError as exc:
            tally[f"error {type(exc).__name__}"] += 1
            continue
        if answer.status_code != 200:
            tally[f"error HTTP {answer.status_code}"] += 1
            continue
        tally["requests"] += 1
        tally["tokens"] += int(answer.json()["usage"]["completion_tokens"])
        tally[f"served by {answer.headers.get(NODE_HEADER, '')}"] += 1


async def _level(a: Served, b: Served, clients: int, seconds: float, blocks: int) -> dict[str, Any]:
    group = [httpx.AsyncClient(timeout=120, trust_env=False) for _ in range(clients)]
    targets = {  # each client's node, per way
        "one_node": [a.base_url] * clients,
        "two_nodes": [(a, b)[i % 2].base_url for i in range(clients)],
    }
    tally: dict[str, Counter[str]] = {w: Counter() for w in WAYS}
    took = dict.fromkeys(WAYS, 0.0)
    try:
        for w in WAYS:  # every connection open before the clock starts
            await asyncio.gather(
                *(c.post(u + "/v1/chat/completions", json=SHORT) for c, u in zip(
                    group, targets[w], strict=True
                )),
                return_exceptions=True,
            )  # fmt: skip
        for k in range(blocks):
            for w in rotate(WAYS, k):
                t0 = time.perf_counter()
                deadline = t0 + seconds / blocks
                await asyncio.gather(
                    *(
                        _worker(c, u, deadline, tally[w])
                        for c, u in zip(group, targets[w], strict=True)
                    )
                )
                took[w] += time.perf_counter() - t0
    finally:
        for c in group:
            await c.aclose()
    out: dict[str, Any] = {}
    for w in WAYS:
        t = tally[w]
        out[w] = {
            "requests": t["requests"],
            "tokens": t["tokens"],
            "errors": sum(v for k, v in t.items() if k.startswith("error")),
            "seconds": round(took[w], 3),
            "requests_per_s": round(t["requests"] / took[w], 2),
            "tokens_per_s": round(t["tokens"] / took[w], 2),
            "served_by": {
                k.removeprefix("served by "): v for k, v in t.items() if k.startswith("served by ")
            },
        }
    out["two_over_one"] = round(
        out["two_nodes"]["requests_per_s"] / max(1e-9, out["one_node"]["requests_per_s"]), 3
    )
    return out


def _throughput(a: Served, b: Served, s: Settings) -> dict[str, Any]:
    levels = {
        str(k): asyncio.run(_level(a, b, k, s.cluster_seconds, s.throughput_blocks))
        for k in s.cluster_clients
    }
    for level in levels.values():  # each node served what was sent to it: no forwarding
        if level["one_node"]["served_by"].keys() - {"a"}:
            raise RuntimeError(f"one node: served elsewhere too: {level['one_node']}")
    return {
        "seconds_per_way": s.cluster_seconds,
        "blocks": s.throughput_blocks,
        "max_tokens": SHORT["max_tokens"],
        "clients": levels,
    }


def measure(s: Settings) -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None  # not on Windows
    out: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_before": load}
    # a PostgreSQL server of our own for the section, stopped and removed after
    with (
        temporary_postgres("hotmodel-bench-pg-") as url,
        two_nodes(url, "smollm2", "gemma3") as (a, b),
    ):
        out["forward"] = _latency(a, b, s.cluster_rounds)
        with client(120) as c:  # B to SmolLM2 too: each node serves it itself
            hotmodel_switch(c, b.base_url, "smollm2")
        wait_ready({"a": a, "b": b}, {"a": "smollm2", "b": "smollm2"})
        out["throughput"] = _throughput(a, b, s)
    return out


# --- the report --------------------------------------------------------------------------


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    return []  # reported, no target of its own


_FIGURES = (
    ("plain", "p50_ms", "plain (1 token) p50 ms"),
    ("plain", "p99_ms", "plain (1 token) p99 ms"),
    ("stream_first_byte", "p50_ms", "stream first byte p50 ms"),
    ("stream_first_byte", "p99_ms", "stream first byte p99 ms"),
)


def markdown(r: dict[str, Any]) -> list[str]:
    f = r["forward"]
    rows = [
        [
            label,
            n(f["routes"]["local"][kind][stat]),
            n(f["routes"]["forwarded"][kind][stat]),
            f"{f['added_ms'][kind][stat]:+.2f}",
        ]
        for kind, stat, label in _FIGURES
    ]
    paired = f.get("added_ms_paired", {})
    for kind, label in (("plain", "plain"), ("stream_first_byte", "stream first byte")):
        if kind in paired:
            diff = paired[kind]["p50_ms"]
            rows.append([f"{label}: median of the rounds' differences", "", "", f"{diff:+.2f}"])
    t = r["throughput"]
    level_rows = [
        [
            clients,
            n(m["one_node"]["requests_per_s"], 1),
            n(m["two_nodes"]["requests_per_s"], 1),
            f"{m['two_over_one']:.3f}x",
            n(m["one_node"]["tokens_per_s"], 1),
            n(m["two_nodes"]["tokens_per_s"], 1),
            f"{m['one_node']['errors']}/{m['two_nodes']['errors']}",
        ]
        for clients, m in t["clients"].items()
    ]
    return [
        "### Cluster: a forwarded request, and two nodes against one",
        "",
        f"Two nodes on one PostgreSQL, on this machine ({r['cpus']} cores shared by both "
        "nodes, their llama-servers, PostgreSQL and the clients). Node A has SmolLM2 "
        "loaded, node B Gemma: SmolLM2 sent to A is local, sent to B it is forwarded to "
        f"A. {f['rounds']} rounds, in turn: a 1-token request, and a stream of "
        f"{f['stream_max_tokens']} tokens (its first byte).",
        "",
        *table(["figure", "local (A)", "forwarded (B → A)", "added ms"], rows),
        f"Then B switched to SmolLM2 too: N keep-alive clients sending {t['max_tokens']}-token "
        "requests back to back, all to A (one node) or half to A and half to B (two "
        f"nodes), {t['seconds_per_way']:g} s per way in {t['blocks']} interleaved blocks.",
        "",
        *table(
            [
                "clients",
                "one node req/s",
                "two nodes req/s",
                "two / one",
                "one node tokens/s",
                "two nodes tokens/s",
                "failed (one/two)",
            ],
            level_rows,
        ),
    ]
