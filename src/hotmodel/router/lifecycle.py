"""Load and unload a model and wait for the router to say it is done, each within a deadline.

The router answers ``/models/load`` and ``/models/unload`` at once and does the
work afterwards, so completion is observed on ``GET /models``: re-read on
every router event (:class:`~hotmodel.router.events.ModelEvents`), with a slow
poll as the safety net for a lost event, or a fast backoff poll when no feed
is connected. ``success: true`` proves nothing: a bad GGUF is accepted and
then ends ``unloaded`` with ``failed: true``.

An unload may also be left to finish in the background (``background=True``):
its process then exits while the next model loads. That model, if loaded
again, waits for its exit first, and :meth:`ModelLifecycle.exited` waits for
all of them (the engine calls it before each command).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from hotmodel.errors import HotModelError, ModelLoadError, RouterError
from hotmodel.router.client import RouterClient
from hotmodel.router.events import ModelEvents
from hotmodel.router.models import ModelState, ModelStatus

log = logging.getLogger("hotmodel.router")

# GET /models is answered from the router's memory: polling it often is cheap
# and keeps the time between "loaded" and our noticing it small.
_POLL_FIRST_S = 0.01
_POLL_MAX_S = 0.1
# With the event feed connected, each event triggers a read at once; this
# slower poll only guards against a lost event.
_POLL_WITH_EVENTS_S = 0.25
# a background exit's wait ends this long after its own deadline, whatever a read does
_EXIT_SLACK_S = 5.0

LOAD_SETTING = "[switch] load_timeout_seconds"
UNLOAD_SETTING = "[switch] unload_timeout_seconds"


class ModelLifecycle:
    """What the control loop needs from the router: idempotent load/unload, awaited."""

    def __init__(
        self,
        client: RouterClient,
        events: ModelEvents | None = None,
        log_tail: Callable[[], str] = lambda: "",
    ) -> None:
        self.client = client
        self.events = events
        self.log_tail = log_tail
        # models asked to unload whose exit is awaited in the background
        self._exits: dict[str, asyncio.Task[None]] = {}

    async def load(self, model: str, timeout: float) -> bool:
        """Load ``model`` and wait until it reads ``loaded``; False when it was running."""
        await self.exited(model)  # the router would take a model on its way out as loaded
        with self._subscription() as changed:
            sent = await self.client.load(model)
            status = await self.wait_loaded(model, timeout, changed)
            self.client.set_direct(model, status.port)  # valid until it is unloaded
            return sent

    async def unload(self, model: str, timeout: float, background: bool = False) -> bool:
        """Unload ``model`` and wait until it reads ``unloaded`` (``background``: wait in a
        task of its own, see :meth:`exited`); False when it was not running."""
        await self.exited(model)
        self.client.drop_direct(model)  # from now on, nothing may reach it directly
        with self._subscription() as changed:
            if not await self.client.unload(model):
                return False
            if background:
                self._exits[model] = asyncio.create_task(
                    self._exit(model, timeout), name=f"exit-{model}"
                )
                return True
            await self.wait_unloaded(model, timeout, changed)
            return True

    @property
    def exiting(self) -> frozenset[str]:
        """The models unloaded in the background whose process has not exited yet."""
        return frozenset(name for name, task in self._exits.items() if not task.done())

    async def _exit(self, model: str, timeout: float) -> None:
        # a hard bound: one read of a hung router could outlast the wait's own deadline,
        # and every later command waits for this
        async with asyncio.timeout(timeout + _EXIT_SLACK_S):
            with self._subscription() as changed:
                await self.wait_unloaded(model, timeout, changed)

    async def exited(self, model: str | None = None) -> None:
        """Wait until the models unloaded in the background (``model``, or all) are gone.

        Never raises: an exit that failed to be seen (the router's own stop timeout
        kills the process) is logged, and what comes next finds out for itself.
        """
        for name, task in list(self._exits.items()):
            if model is not None and name != model:
                continue
            try:
                await asyncio.shield(task)  # a cancelled caller leaves the wait to others
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not task.cancelled() or (current is not None and current.cancelling()):
                    raise  # the caller's own cancellation
            except Exception as exc:
                why = str(exc) or "the router did not say so in time"
                log.warning("model %r: its unload was not seen to finish: %s", name, why)
            if self._exits.get(name) is task:
                del self._exits[name]

    async def aclose(self) -> None:
        """Stop waiting for exits (at shutdown: the router goes with everything in it)."""
        tasks = list(self._exits.values())
        self._exits.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @contextlib.contextmanager
    def _subscription(self) -> Iterator[asyncio.Event | None]:
        """Subscribed before the command is sent, so its completion event cannot be missed."""
        if self.events is None:
            yield None
            return
        with self.events.subscribe() as changed:
            yield changed

    async def wait_loaded(
        self, model: str, timeout: float, changed: asyncio.Event | None = None
    ) -> ModelStatus:
        """Wait until ``model`` reads ``loaded``; a failed load or the deadline raises."""
        seen_loading = False

        def done(status: ModelStatus) -> bool:
            nonlocal seen_loading
            if status.state is ModelState.LOADING:
                seen_loading = True
            elif status.state is ModelState.UNLOADED and (seen_loading or status.failed):
                # A stale `failed` flag from an earlier attempt reads the same, but the
                # router flips the status to `loading` before it answers the load request.
                code = f" (exit code {status.exit_code})" if status.exit_code is not None else ""
                raise ModelLoadError(f"model {model!r} failed to load{code}", self.log_tail())
            return status.state is ModelState.LOADED

        def timed_out(status: ModelStatus) -> HotModelError:
            return ModelLoadError(
                f"model {model!r} did not reach 'loaded' within {timeout:g}s "
                f"({LOAD_SETTING}; status {status.state.value!r})",
                self.log_tail(),
            )

        return await self._watch(model, timeout, done, timed_out, changed)

    async def wait_unloaded(
        self, model: str, timeout: float, changed: asyncio.Event | None = None
    ) -> ModelStatus:
        """Wait until ``model`` reads ``unloaded``.

        A ``failed`` flag is ignored here: the router sets it when a child it
        was asked to stop exits non-zero, which an unload is allowed to cause.
        """

        def timed_out(status: ModelStatus) -> HotModelError:
            return RouterError(
                f"model {model!r} did not reach 'unloaded' within {timeout:g}s "
                f"({UNLOAD_SETTING}; status {status.state.value!r})"
            )

        return await self._watch(
            model, timeout, lambda s: s.state is ModelState.UNLOADED, timed_out, changed
        )

    async def _watch(
        self,
        model: str,
        timeout: float,
        done: Callable[[ModelStatus], bool],
        timed_out: Callable[[ModelStatus], HotModelError],
        changed: asyncio.Event | None,
    ) -> ModelStatus:
        """Read ``GET /models`` until ``done(status)``, or raise ``timed_out`` at the deadline."""
        deadline = time.monotonic() + timeout
        delay = _POLL_FIRST_S
        while True:
            if changed is not None:
                changed.clear()  # before the read: an event after it wakes the wait below
            status = (await self.client.models()).get(model)
            if status is None:
                raise ModelLoadError(f"model {model!r} is not known to the router")
            if done(status):
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timed_out(status)
            if changed is None or self.events is None or not self.events.connected:
                pause = min(delay, remaining)
                delay = min(delay * 2, _POLL_MAX_S)
            else:
                pause = min(_POLL_WITH_EVENTS_S, remaining)
            if changed is None:
                await asyncio.sleep(pause)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await changed.wait()
