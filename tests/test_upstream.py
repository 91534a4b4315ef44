"""The upstream limit: no more requests per model upstream at once than its slots + 1,
first come first served, released on every path."""

from __future__ import annotations

import asyncio

import pytest

from hotmodel.control.upstream import HEADROOM, UpstreamSlots


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_at_most_slots_plus_one_go_upstream_and_the_rest_go_in_arrival_order() -> None:
    async def scenario() -> tuple[list[str], int, int]:
        limits = UpstreamSlots(lambda model: 2 if model == "a" else 1)
        inside: list[str] = []
        release = asyncio.Event()

        async def request(name: str, model: str) -> None:
            async with limits.hold(model):
                inside.append(name)
                await release.wait()

        tasks = [asyncio.create_task(request(f"a{i}", "a")) for i in range(6)]
        tasks.append(asyncio.create_task(request("b0", "b")))
        await _settle()
        first = list(inside)
        waiting = limits.waiting("a")
        assert limits.status() == {"a": waiting}
        release.set()
        await asyncio.gather(*tasks)
        return first, waiting, len(inside)

    first, waiting, served = asyncio.run(scenario())
    assert first == ["a0", "a1", "a2", "b0"]  # 2 + 1 for a, 1 + 1 for b (one asked)
    assert waiting == 6 - (2 + HEADROOM)
    assert served == 7


def test_a_cancelled_waiter_and_a_failed_holder_give_their_place_back() -> None:
    async def scenario() -> tuple[int, list[str]]:
        limits = UpstreamSlots(lambda model: 1)
        order: list[str] = []
        gate = asyncio.Event()

        async def holder(name: str) -> None:
            async with limits.hold("m"):
                order.append(name)
                await gate.wait()
                if name == "h0":
                    raise RuntimeError("the upstream call failed")

        held = [asyncio.create_task(holder(f"h{i}")) for i in range(2)]
        await _settle()
        gone = asyncio.create_task(holder("left"))  # its client leaves while it waits
        late = asyncio.create_task(holder("late"))
        await _settle()
        assert limits.waiting("m") == 2
        gone.cancel()
        await _settle()
        waiting_after_cancel = limits.waiting("m")
        gate.set()
        results = await asyncio.gather(*held, late, return_exceptions=True)
        assert isinstance(results[0], RuntimeError)
        with pytest.raises(asyncio.CancelledError):
            await gone
        return waiting_after_cancel, order

    waiting, order = asyncio.run(scenario())
    assert waiting == 1
    assert order == ["h0", "h1", "late"]  # the cancelled one never went upstream
