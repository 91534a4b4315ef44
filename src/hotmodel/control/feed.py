"""The live feed: one hub that fans hotmodel's events out to every open dashboard stream.

Two sources publish here: the engine (as one of its ``watchers``: every
phase of every command, then its finished report) and the router's model
event feed (a model's status changed). Each subscriber (one open
``GET /admin/events``) has its own bounded queue, and publishing never
waits: a slow or stalled browser can never hold up a switch or the event
loop. When a subscriber's queue is full, what it had queued is dropped and
replaced by one ``resync`` event: the stream then sends a fresh status and
the page reloads what it shows, so a subscriber that fell behind heals
instead of growing without bound. Everything runs on the event loop's
thread, like its sources, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hotmodel.control.report import SwitchEvent, SwitchReport
from hotmodel.router.events import ModelEvent

# Events one subscriber may have waiting. A switch emits about 20 phase events;
# this holds a dozen switches, far more than a browser that keeps up ever lags.
QUEUE_MAX = 256

PHASE, REPORT, MODEL, RESYNC, CLOSED = "phase", "report", "model", "resync", "closed"


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One event for the dashboard: its SSE event name and its JSON body."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


class Subscription:
    """One subscriber's bounded queue of events."""

    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[FeedEvent] = asyncio.Queue(maxsize)
        self.dropped = 0
        self.closed = False

    def offer(self, event: FeedEvent) -> None:
        """Queue ``event`` without waiting; when full, drop the backlog for a ``resync``."""
        if self.closed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += self._clear() + 1
            self._queue.put_nowait(FeedEvent(RESYNC, {"dropped": self.dropped}))

    def close(self) -> None:
        """End the subscription: the reader gets ``closed`` next, whatever was queued."""
        if not self.closed:
            self._clear()
            self._queue.put_nowait(FeedEvent(CLOSED))
            self.closed = True

    async def next(self, timeout: float) -> FeedEvent | None:
        """The next event, or None when ``timeout`` seconds passed without one."""
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None

    def _clear(self) -> int:
        """Empty the queue; how many real events that dropped (a resync marker is none)."""
        count = 0
        while not self._queue.empty():
            count += self._queue.get_nowait().kind != RESYNC
        return count


class Feed:
    """The hub: sources publish, every subscription gets its own copy."""

    def __init__(self, maxsize: int = QUEUE_MAX) -> None:
        self._maxsize = maxsize
        self._subscriptions: set[Subscription] = set()
        self.closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """A subscription for the ``with`` block; removed however the block ends."""
        subscription = Subscription(self._maxsize)
        if self.closed:
            subscription.close()
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        event = FeedEvent(kind, data)
        for subscription in list(self._subscriptions):
            subscription.offer(event)

    def watch(self, item: SwitchEvent | SwitchReport) -> None:
        """An engine watcher: each phase as it happens, each report when its command ends."""
        if isinstance(item, SwitchReport):
            self.publish(REPORT, item.to_json())
        else:
            self.publish(PHASE, item.to_json())

    def model_event(self, event: ModelEvent) -> None:
        """A listener of the router's model events (loading, loaded, unloaded...)."""
        state = None if event.state is None else event.state.value
        self.publish(MODEL, {"model": event.model, "event": event.kind, "status": state})

    def close(self) -> None:
        """At stop: every open stream ends now (an open dashboard must not hold up the
        graceful shutdown), and later subscriptions end at once."""
        self.closed = True
        for subscription in list(self._subscriptions):
            subscription.close()
