"""The cluster's registry on a real PostgreSQL, and placement's pure decisions."""

from __future__ import annotations

import asyncio

import pytest

from hotmodel.cluster.placement import Node, NodeState, Where, choose_loader, place
from hotmodel.cluster.registry import Identity, Registry
from hotmodel.errors import ClusterError


def node(
    node_id: str,
    *,
    loaded: tuple[str, ...] = (),
    presets: tuple[str, ...] = ("a", "b"),
    inflight: dict[str, int] | None = None,
    queued: dict[str, int] | None = None,
    free: int | None = None,
    alive: bool = True,
) -> Node:
    state = NodeState(
        presets, loaded, loaded[0] if loaded else None, inflight or {}, queued or {}, free
    )
    return Node(node_id, f"http://{node_id}", state, 0.5 if alive else 99.0, alive)


# --- placement, pure ---


def test_a_model_loaded_here_is_served_here() -> None:
    assert place("a", "n1", True, [node("n2", loaded=("a",))]).where is Where.HERE


def test_a_model_loaded_elsewhere_goes_to_the_least_busy_holder() -> None:
    nodes = [
        node("n2", loaded=("a",), inflight={"a": 3}),
        node("n3", loaded=("a",), inflight={"a": 1}, queued={"a": 1}),
        node("n4", loaded=("a",), inflight={"a": 1}, alive=False),
    ]
    found = place("a", "n1", False, nodes)
    assert (found.where, found.node and found.node.id) == (Where.FORWARD, "n3")
    again = place("a", "n1", False, nodes, skip=frozenset({"n3"}))
    assert again.node is not None and again.node.id == "n2"


def test_a_model_a_node_is_loading_goes_there_when_none_has_it_loaded() -> None:
    loading = Node("n2", "http://n2", NodeState(("a",), (), None, {}, {}, None, "a"), 0.1, True)
    found = place("a", "n1", False, [loading])
    assert (found.where, found.node and found.node.id) == (Where.FORWARD, "n2")
    holder = node("n3", loaded=("a",))
    assert place("a", "n1", False, [loading, holder]).node == holder  # loaded first
    assert NodeState.from_json(loading.state.to_json()) == loading.state


def test_a_model_no_live_node_has_is_claimed() -> None:
    nodes = [node("n2", loaded=("a",), alive=False), node("n3", loaded=("b",))]
    assert place("a", "n1", False, nodes).where is Where.CLAIM


def test_the_loader_is_idle_first_then_least_waiting_then_most_memory() -> None:
    busy_here = node("n1", inflight={"b": 1})
    idle_small = node("n2", free=1000)
    idle_big = node("n3", free=8000)
    assert choose_loader("a", "n1", [busy_here, idle_small, idle_big]) == "n3"
    waiting = [node("n1", queued={"b": 2}), node("n2", queued={"b": 1}, inflight={"b": 5})]
    assert choose_loader("a", "n1", waiting) == "n2"
    assert choose_loader("a", "n1", [node("n1"), node("n2")]) == "n1"  # a tie: no forward
    assert choose_loader("z", "n1", [node("n2")]) == "n1"  # no node has the preset
    assert choose_loader("a", "n1", [node("n2", presets=("b",)), node("n3")]) == "n3"


def test_a_loader_whose_free_memory_is_short_is_passed_over_while_another_fits() -> None:
    short_idle, fits_busy = node("n2", free=500), node("n3", free=4000, inflight={"b": 1})
    assert choose_loader("a", "n1", [short_idle, fits_busy], need_mib=1000) == "n3"
    unknown = node("n4")  # no probe: it may fit
    assert choose_loader("a", "n1", [short_idle, unknown], need_mib=1000) == "n4"
    # none fits: the usual rules (idle first), not nothing
    assert (
        choose_loader("a", "n1", [short_idle, node("n5", free=600, queued={"b": 1})], 1000) == "n2"
    )


def test_node_state_survives_its_json_and_ignores_junk() -> None:
    state = NodeState(("a",), ("a",), "a", {"a": 2}, {"b": 1}, 512)
    assert NodeState.from_json(state.to_json()) == state
    assert NodeState.from_json({"loaded": "a", "in_flight": {"a": "x"}}) == NodeState()


# --- the registry, on a real PostgreSQL ---


def registry(url: str, name: str, state: NodeState, dead_after: float = 5.0) -> Registry:
    async def current() -> NodeState:
        return state

    return Registry(url, Identity(name, f"http://{name}", 0.1, dead_after), current)


def test_nodes_see_each_other_and_leave_cleanly(postgres_url: str) -> None:
    async def main() -> None:
        async with registry(postgres_url, "a", NodeState(("m",), ("m",), "m")) as a:
            async with registry(postgres_url, "b", NodeState(("m",))) as b:
                await a.refresh()
                assert [n.id for n in a.alive()] == ["a", "b"]
                assert b.nodes[0].state.loaded == ("m",)
            await a.refresh()
            assert [n.id for n in a.nodes] == ["a"]  # b deleted its row on the way out

    asyncio.run(main())


def test_a_node_that_stops_beating_is_out(postgres_url: str) -> None:
    async def main() -> None:
        async with registry(postgres_url, "a", NodeState(), dead_after=1.0) as a:
            async with registry(postgres_url, "b", NodeState(), dead_after=1.0):
                pass
            b = registry(postgres_url, "b", NodeState(), dead_after=1.0)
            await b.__aenter__()  # joins, then never beats again and never leaves
            try:
                await a.beat()  # a's own row fresh (b's joins took their time meanwhile)
                assert {n.id for n in a.alive()} == {"a", "b"}
                await asyncio.sleep(1.3)
                await a.beat()
                assert [n.id for n in a.alive()] == ["a"]
            finally:
                await b.__aexit__(None, None, None)

    asyncio.run(main())


def test_a_burst_of_claims_on_two_nodes_agrees_on_one_loader(postgres_url: str) -> None:
    async def main() -> None:
        async with (
            registry(postgres_url, "a", NodeState(("m",))) as a,
            registry(postgres_url, "b", NodeState(("m",))) as b,
        ):
            picks: list[str] = []

            def choose(nodes: object) -> str:
                picks.append("chose")
                return "b"

            answers = await asyncio.gather(*(r.claim("m", choose, 30.0) for r in [a, b] * 10))
            assert set(answers) == {"b"}
            assert picks == ["chose"]  # one choice; the 19 others found the claim

    asyncio.run(main())


def test_an_unreachable_postgres_is_a_cluster_error() -> None:
    async def main() -> None:
        with pytest.raises(ClusterError, match="cannot be reached"):
            async with registry("postgresql://hotmodel@127.0.0.1:1/postgres", "a", NodeState()):
                pass

    asyncio.run(main())
