"""What goes upstream at once: no more requests per model than it can serve.

llama-server serves HTTP with a pool of ``max(n_parallel + 2, cores - 1)``
threads, each bound to one kept-alive connection until it has been idle for
5 s. A flood of concurrent requests sent straight on (64 clients) opens as
many connections to the model's server: the few threads stay bound to a few
of them while requests on the others wait for a thread, and whatever else
needs the server (a tokenize, a slot save) waits behind them. The bare router
never floods its child this way: its own thread pool lets only that many in.

So at most ``slots + 1`` requests per model are upstream at once (its slots,
and one queued behind them so that a freed slot never waits for hotmodel);
the others wait here, first come first served, holding their admission
ticket (a switch drains them like requests queued in llama-server). The wait
is as unbounded as llama-server's own queue; a client that leaves stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

HEADROOM = 1  # requests queued in llama-server beyond its slots: a freed slot starts at once


class UpstreamSlots:
    """Per model, a first-come-first-served limit on the requests upstream at once."""

    def __init__(self, slots: Callable[[str], int] = lambda model: 1) -> None:
        self._slots = slots  # requests a model serves at once (its np, [router] parallel)
        self._limits: dict[str, tuple[int, asyncio.Semaphore]] = {}
        self._waiting: dict[str, int] = {}

    def _semaphore(self, model: str) -> asyncio.Semaphore:
        size = max(1, self._slots(model)) + HEADROOM
        known = self._limits.get(model)
        if known is None or known[0] != size:  # a reload changed its slots: new holders
            known = (size, asyncio.Semaphore(size))  # (old holders release the old one)
            self._limits[model] = known
        return known[1]

    @contextlib.asynccontextmanager
    async def hold(self, model: str) -> AsyncIterator[None]:
        """Wait for a place upstream for ``model`` (first come, first served) and hold it
        for the block; released on every path, cancellation included."""
        semaphore = self._semaphore(model)
        self._waiting[model] = self._waiting.get(model, 0) + 1
        try:
            await semaphore.acquire()
        finally:
            self._waiting[model] -= 1
        try:
            yield
        finally:
            semaphore.release()

    def waiting(self, model: str) -> int:
        """Requests waiting here for a place upstream."""
        return self._waiting.get(model, 0)

    def status(self) -> dict[str, int]:
        """Per model with waiters: how many wait for a place upstream."""
        return {m: n for m, n in self._waiting.items() if n}
