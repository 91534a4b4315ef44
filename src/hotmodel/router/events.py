"""The router's ``GET /models/sse`` feed: one subscription, one parser, shared by every waiter.

:class:`ModelEvents` keeps one event stream open while the router runs (and
opens it again after a break, with a backoff). Each event is parsed once into
a :class:`ModelEvent`; every waiter that subscribed is woken. Waiters treat an
event as "look now": ``GET /models`` stays the authority on a model's state.
``on_event`` (the watchdog) and every callable in ``listeners`` (the
dashboard's feed) get each parsed event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hotmodel.errors import RouterError
from hotmodel.router.client import RouterClient
from hotmodel.router.models import ModelState
from hotmodel.sse import SseEvent

log = logging.getLogger("hotmodel.router.events")

# After the stream breaks (router restart, keep-alive cut), reconnect after this
# long, doubling up to the maximum.
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 2.0


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """One router event: ``{"model": ID, "event": "status_change", "data": {"status": ...}}``."""

    model: str
    kind: str
    state: ModelState | None
    progress: float | None = None  # 0..1 while loading, where the router says
    stage: str | None = None  # what it is loading ("text_model", ...)


def parse_model_event(event: SseEvent) -> ModelEvent | None:
    """The router's event, or None for anything that is not one (pure)."""
    try:
        payload = event.json()
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
        return None
    data = payload.get("data")
    status = data.get("status") if isinstance(data, dict) else None
    progress = data.get("progress") if isinstance(data, dict) else None
    value = progress.get("value") if isinstance(progress, dict) else None
    stage = progress.get("current") if isinstance(progress, dict) else None
    return ModelEvent(
        model=payload["model"],
        kind=str(payload.get("event", "")),
        state=None if status is None else ModelState.parse(status),
        progress=float(value) if isinstance(value, int | float) and 0 <= value <= 1 else None,
        stage=stage if isinstance(stage, str) else None,
    )


class ModelEvents:
    """Fans the router's model events out to every subscribed waiter."""

    def __init__(
        self, client: RouterClient, on_event: Callable[[ModelEvent], None] | None = None
    ) -> None:
        self._client = client
        self.on_event = on_event  # the watchdog's
        # every other observer (the dashboard's feed); each is called on every event
        self.listeners: list[Callable[[ModelEvent], None]] = []
        self._subscribers: set[asyncio.Event] = set()
        self.connected = False

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Event]:
        """An event set on every router event while the ``with`` block runs."""
        changed = asyncio.Event()
        self._subscribers.add(changed)
        try:
            yield changed
        finally:
            self._subscribers.discard(changed)

    def _wake(self) -> None:
        for changed in self._subscribers:
            changed.set()

    async def run(self) -> None:
        """Keep the feed open until cancelled (the runtime owns this task)."""
        delay = RECONNECT_FIRST_S
        while True:
            try:
                async with self._client.model_events() as events:
                    self.connected = True
                    delay = RECONNECT_FIRST_S
                    self._wake()  # anything may have changed while we were away
                    async for raw in events:
                        parsed = parse_model_event(raw)
                        if parsed is not None:
                            self._wake()
                            if self.on_event is not None:
                                self.on_event(parsed)
                            for listener in list(self.listeners):
                                with contextlib.suppress(Exception):  # an observer must not
                                    listener(parsed)  # break the feed the switches wait on
            except RouterError as exc:
                log.debug("model event feed: %s", exc)
            finally:
                self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
