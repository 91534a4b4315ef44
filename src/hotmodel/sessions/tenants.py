"""Which API key's prompt each model's slot holds: no key reuses another key's cache.

llama-server reuses the longest prefix a slot already holds (``cache_prompt``)
and reports it (``timings.cache_n``, ``usage...cached_tokens``); how much was
reused, and how fast the prefill went, tells whether a guessed prefix matches
what another client sent ("My bank PIN is 4..."). So, per slot:

- the key whose prompt the slot holds is recorded by every request that writes
  it (chat turns, the replay after a switch, a KV snapshot's restore);
- a request of another key is sent with ``cache_prompt: false``: llama-server
  evaluates its whole prompt, reports no cached token, and takes as long as for
  any other prompt of that length;
- requests of different keys never run on one slot at the same time (one
  waits for the other's to end, at most ``[session] queue_timeout_seconds``),
  since the order in which llama-server receives two concurrent requests is not
  the order in which they were labelled here. With ``parallel > 1`` each key is
  pinned to one slot (``id_slot``), so keys mostly run side by side.

With no keys every request is the same owner (``""``): nothing waits and the
cache is always reused. llama-server's host-memory prompt cache (``--cache-ram``),
which can bring one slot's prompt back into another, is turned off whenever keys
are set (``router_argv``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hotmodel.errors import SlotBusyError


@dataclass
class _Slot:
    """One slot's state: the key whose prompt it holds, and the requests on it now."""

    last: str | None = None  # whose prompt the slot holds (None: unknown, e.g. just loaded)
    holder: str | None = None  # the key whose requests run on it now
    running: int = 0
    waiting: deque[tuple[str, asyncio.Future[None]]] = field(default_factory=deque)


class SlotTenants:
    """Per (model, slot): whose prompt it holds, and one key's requests at a time."""

    def __init__(self, parallel: int) -> None:
        self.parallel = parallel
        self._slots: dict[tuple[str, int], _Slot] = {}

    def slot_for(self, owner: str) -> int:
        """The slot ``owner``'s requests use (always 0 with one slot per model)."""
        if self.parallel <= 1:
            return 0
        digest = hashlib.sha256(owner.encode()).digest()
        return int.from_bytes(digest[:4], "big") % self.parallel

    def pinned(self, owner: str) -> int | None:
        """The ``id_slot`` to send (None: one slot, nothing to pin)."""
        return None if self.parallel <= 1 else self.slot_for(owner)

    def wrote(self, model: str, owner: str) -> None:
        """Something outside a request (a KV restore) filled ``owner``'s slot on ``model``."""
        self._slot(model, self.slot_for(owner)).last = owner

    @contextlib.asynccontextmanager
    async def use(self, model: str, owner: str, timeout: float) -> AsyncIterator[bool]:
        """Hold ``owner``'s slot on ``model`` for one request; yields whether it may reuse
        the slot's prompt cache (it holds this key's own prompt)."""
        slot = self._slot(model, self.slot_for(owner))
        await self._acquire(slot, owner, timeout)
        try:
            reuse = slot.last == owner
            slot.last = owner
            yield reuse
        finally:
            self._release(slot)

    def _slot(self, model: str, index: int) -> _Slot:
        return self._slots.setdefault((model, index), _Slot())

    async def _acquire(self, slot: _Slot, owner: str, timeout: float) -> None:
        if slot.running == 0 or (slot.holder == owner and not slot.waiting):
            slot.holder = owner
            slot.running += 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (owner, granted)
        slot.waiting.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await granted
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self._release(slot)  # granted as it gave up: hand the turn on
            else:
                slot.waiting.remove(entry)
                granted.cancel()
            if isinstance(exc, TimeoutError):
                raise SlotBusyError(
                    f"another API key's request held this model's slot past {timeout:g}s "
                    "([session] queue_timeout_seconds); try again"
                ) from None
            raise

    def _release(self, slot: _Slot) -> None:
        slot.running -= 1
        if slot.running > 0 or not slot.waiting:
            return
        # the next key in line, with every request of that key queued behind it
        nxt = slot.waiting[0][0]
        slot.holder = nxt
        for entry in [e for e in slot.waiting if e[0] == nxt]:
            slot.waiting.remove(entry)
            entry[1].set_result(None)
            slot.running += 1
