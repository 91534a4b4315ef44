"""The traffic gate: admits chat requests, holds them during a switch, tracks in-flight ones.

Every chat request holds a :class:`Ticket` from admission until its answer is
complete (for a stream: until the last byte is relayed or the client leaves).
Admission is a context (:meth:`TrafficGate.admit`): the ticket is returned on
every exit path of its ``async with`` block, errors and cancellation included,
so no code path can leave one behind (a leaked ticket would make every later
switch wait out its whole drain timeout).
A switch closes the gate (new requests wait, bounded), drains the in-flight
tickets of the model it is about to unload (bounded), and may cancel them.
Pure asyncio, no I/O: the switch engine's unit tests use the real gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio

from hotmodel.errors import SwitchBusyError, SwitchError

# the error code a cancelled request's client gets: by a switch, or by hotmodel's stop
SWITCH_CANCELLED = "switch_cancelled"
SHUTTING_DOWN = "shutting_down"


class Ticket:
    """One admitted request; ``model`` is set once the request's model is resolved."""

    def __init__(self, ticket_id: int) -> None:
        self.id = ticket_id
        self.model: str | None = None
        # a resident model's request: no switch waits for it, and it is not activity
        # that keeps the switched model from its idle unload
        self.beside = False
        self.cancel_reason: str | None = None
        self.cancel_code = SWITCH_CANCELLED  # the error code the client gets
        self._scope: anyio.CancelScope | None = None

    def bind(self, scope: anyio.CancelScope) -> None:
        """The request's upstream I/O runs in ``scope``; :meth:`cancel` cancels it."""
        self._scope = scope
        if self.cancel_reason is not None:
            scope.cancel()

    def cancel(self, reason: str, code: str = SWITCH_CANCELLED) -> None:
        self.cancel_reason, self.cancel_code = reason, code
        if self._scope is not None:
            self._scope.cancel()


@dataclass(frozen=True, slots=True)
class Drained:
    """How a drain went: requests waited for, requests cancelled, a note for the report."""

    drained: int
    cancelled: int
    detail: str | None


class TrafficGate:
    """Open: requests pass. Closed: they wait until it opens again, or their bound ends.

    Opening hands a ticket to every held request at once, synchronously: they
    are in flight before anything else can run, so a command queued behind the
    one that opened the gate drains them rather than holding them again.
    """

    def __init__(self) -> None:
        self._open = True
        self._recovering = False  # closed for a recovery: only the recovery opens it
        self._ids = itertools.count(1)
        self._inflight: dict[int, Ticket] = {}
        self._held: list[asyncio.Future[Ticket]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._last_activity = time.monotonic()  # a request admitted or completed
        # told when a request is admitted or completes (the scheduler decides again)
        self.on_change: Callable[[], None] | None = None
        self._served: dict[str, float] = {}  # per model: when a request of it last ended
        # set while a recovery holds the gate closed (chat: a refused connection waits)
        self._recovery = asyncio.Event()

    def last_served(self, model: str) -> float | None:
        """When a request resolved to ``model`` last ended (None: none yet). A request
        for another model takes a ticket too, briefly: it does not count here."""
        return self._served.get(model)

    def _changed(self, activity: bool = True) -> None:
        if activity:
            self._last_activity = time.monotonic()
        if self.on_change is not None:
            self.on_change()

    def idle_for(self) -> float:
        """Seconds since a request was last admitted or completed (0 while any is in flight);
        a resident model's requests do not count (its traffic does not keep the switched
        model loaded)."""
        if any(not t.beside for t in self._inflight.values()):
            return 0.0
        return time.monotonic() - self._last_activity

    @property
    def is_open(self) -> bool:
        return self._open

    def inflight(self, models: set[str] | None = None) -> list[Ticket]:
        """Admitted tickets, of ``models`` only when given (unresolved ones always count)."""
        return [
            t
            for t in self._inflight.values()
            if models is None or t.model is None or t.model in models
        ]

    @contextlib.asynccontextmanager
    async def admit(self, timeout: float, beside: bool = False) -> AsyncIterator[Ticket]:
        """A ticket for the ``async with`` block, returned when the block ends, however.
        ``beside``: a request for a resident model, which no switch touches: a switch's
        closed gate does not hold it (a recovery's does: the router is coming back)."""
        ticket = await self._enter(timeout, beside)
        ticket.beside = beside  # (one held through a recovery was issued as any other)
        try:
            yield ticket
        finally:
            self._leave(ticket)

    def _issue(self, beside: bool = False) -> Ticket:
        ticket = Ticket(next(self._ids))
        ticket.beside = beside
        self._inflight[ticket.id] = ticket
        self._changed(activity=not beside)
        return ticket

    async def _enter(self, timeout: float, beside: bool = False) -> Ticket:
        """Admit a request, waiting up to ``timeout`` seconds while the gate is closed."""
        if self._open or (beside and not self._recovery.is_set()):
            return self._issue(beside)
        held: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._held.append(held)
        try:
            async with asyncio.timeout(timeout):
                return await held
        except BaseException as exc:
            if held in self._held:
                self._held.remove(held)
            if held.done() and not held.cancelled():
                self._leave(held.result())  # granted just as the wait ended: give it back
            if isinstance(exc, TimeoutError):
                raise SwitchBusyError(
                    f"a model switch is in progress; waited {timeout:g}s "
                    "([switch] queue_timeout_seconds)"
                ) from None
            raise

    def _leave(self, ticket: Ticket) -> None:
        """The request is complete (idempotent)."""
        if self._inflight.pop(ticket.id, None) is None:
            return
        if ticket.model is not None:
            self._served[ticket.model] = time.monotonic()
        self._changed(activity=not ticket.beside)
        still_waiting = []
        for done, fut in self._waiters:
            if fut.done():
                continue
            if done():
                fut.set_result(None)
            else:
                still_waiting.append((done, fut))
        self._waiters = still_waiting

    def close(self, for_recovery: bool = False) -> None:
        self._open = False
        self._recovering = self._recovering or for_recovery
        if for_recovery:
            self._recovery.set()

    async def recovery_begins(self, timeout: float) -> bool:
        """Wait until a recovery closes the gate (True), at most ``timeout`` (False)."""
        if self._recovering or self._recovery.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._recovery.wait()
        except TimeoutError:
            return False
        return True

    def begin_recovery(self) -> None:
        """A recovery starts: it holds the gate closed now, and opens it when it ends."""
        self._open = False
        self._recovering = False
        self._recovery.set()

    def open(self) -> None:
        """Let requests in, unless a recovery is pending: a switch that fails because the
        router died must not release requests before the recovery has run."""
        if not self._recovering:
            self._open = True
            self._recovery.clear()
        held, self._held = self._held, []
        for fut in held:
            if not fut.done():
                fut.set_result(self._issue())

    async def drain(self, models: set[str] | None, timeout: float) -> bool:
        """Wait until no ticket of ``models`` is in flight; False when ``timeout`` ends first."""

        def done() -> bool:
            return not self.inflight(models)

        if done():
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((done, fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            return False
        return True

    async def drain_model(
        self, model: str, timeout: float, cancel_grace: float | None, reason: str
    ) -> Drained:
        """Wait for ``model``'s requests to finish (``timeout``: [server]
        switch_drain_timeout_seconds); past it, fail (SwitchError), or with
        ``cancel_grace`` cancel them and wait that long for them to end."""
        models = {model}
        drained = len(self.inflight(models))
        if await self.drain(models, timeout):
            return Drained(drained, 0, f"{drained} request(s) finished" if drained else None)
        still = len(self.inflight(models))
        if cancel_grace is None:
            raise SwitchError(
                f"{still} generation(s) on {model!r} still running after {timeout:g}s "
                "([server] switch_drain_timeout_seconds); nothing was changed"
            )
        cancelled = self.cancel(models, reason)
        if not await self.drain(models, cancel_grace):
            raise SwitchError(
                f"{still} cancelled generation(s) on {model!r} did not end within "
                f"{cancel_grace:g}s ([switch] cancel_grace_seconds)"
            )
        return Drained(drained, cancelled, f"cancelled {cancelled} request(s) after {timeout:g}s")

    def cancel(self, models: set[str] | None, reason: str, code: str = SWITCH_CANCELLED) -> int:
        """Cancel the in-flight requests of ``models`` (None: all); returns how many."""
        tickets = self.inflight(models)
        for t in tickets:
            t.cancel(reason, code)
        return len(tickets)
