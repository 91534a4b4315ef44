"""``GET /admin/events``: the dashboard's live feed, as server-sent events.

The stream opens with ``event: status`` (the body of ``GET /admin/status``),
then relays the feed (``control/feed.py``): ``phase`` (a step of a command
started, ended, failed or was skipped), ``report`` (a command ended: its
report, as in ``GET /admin/switches``), then a fresh ``status``; ``model`` (the
router says a model's status changed). A fresh ``status`` also comes before
the first phase of each new command, so a page learns from where to where it
goes. ``resync`` says events were dropped because this reader fell behind
(a fresh ``status`` follows; reload the rest). A ``: keep-alive`` comment
every :data:`KEEPALIVE_S` seconds keeps proxies from closing an idle stream.

This is a plain ASGI response rather than a generator behind Starlette's
``StreamingResponse``: the subscription is taken and released in one
``with`` block here, and a disconnect is noticed at once (by a task reading
``receive``) even while no event is due, so every way out (the client leaves,
a send fails, hotmodel stops) removes the subscription.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from hotmodel import sse
from hotmodel.api.admin import status_body
from hotmodel.control.feed import CLOSED, PHASE, REPORT, RESYNC, FeedEvent, Subscription
from hotmodel.runtime import Runtime

KEEPALIVE_S = 15.0
_KEEPALIVE = b": keep-alive\n\n"
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: do not buffer the stream
]


class EventStream(Response):
    """One subscriber's stream, from subscribe to disconnect."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self._switch_id: int | None = None  # the command whose phases were last sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self.runtime.services.feed.subscribe() as subscription:
            watcher = asyncio.create_task(_close_on_disconnect(receive, subscription))
            try:
                await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
                await self._send(send, self._status())
                await self._relay(subscription, send)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the client went away mid-send: nothing more to say to it
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _relay(self, subscription: Subscription, send: Send) -> None:
        while True:
            event = await subscription.next(KEEPALIVE_S)
            if event is None:
                await self._send(send, _KEEPALIVE)
            elif event.kind == CLOSED:
                return
            else:
                await self._send(send, self._render(event))

    def _render(self, event: FeedEvent) -> bytes:
        """An event as SSE bytes, with the fresh status that goes with it."""
        out = b""
        if event.kind == PHASE and event.data.get("switch_id") != self._switch_id:
            self._switch_id = event.data.get("switch_id")
            out += self._status()  # a new command: its from/to are in status.switch.current
        out += sse.encode(event.data, event.kind)
        if event.kind in (REPORT, RESYNC):
            out += self._status()
        return out

    def _status(self) -> bytes:
        return sse.encode(status_body(self.runtime), "status")

    @staticmethod
    async def _send(send: Send, chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _close_on_disconnect(receive: Receive, subscription: Subscription) -> None:
    """Read ``receive`` until the client is gone, then end the stream."""
    while (await receive())["type"] != "http.disconnect":
        pass
    subscription.close()


def event_routes(runtime: Runtime) -> list[Route]:
    async def events(request: Request) -> Response:
        return EventStream(runtime)

    return [Route("/admin/events", events, methods=["GET"])]
