"""Admission, shared by every inference endpoint: which model a request goes to, when it
may go, and on which slot.

- :func:`resolve_model`: ``"active"``, omitted or the active id → the active preset;
  another preset → :class:`~hotmodel.errors.ModelNotActiveError` (a switch, with
  ``[switch] auto``); anything else → 404.
- :meth:`Admission.admitted`: a traffic ticket naming the model (a resident is admitted
  beside the scheduler; another preset waits in its queue for the switch).
- :meth:`Admission.own_slot`: the key's slot on the model, and whether the request
  may reuse its prompt cache (``sessions/tenants.py``).

Chat (``api/chat.py``) and the other endpoints (``api/inference.py``) use them alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection
from typing import Any

import anyio
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from hotmodel.api.relay import DisconnectWatch
from hotmodel.control.scheduler import Tell
from hotmodel.control.traffic import Ticket
from hotmodel.errors import (
    AutoSwitchForbiddenError,
    ModelNotActiveError,
    ModelNotFoundError,
    RouterUnavailableError,
)
from hotmodel.runtime import Services
from hotmodel.sessions.service import SessionRef

ACTIVE_ALIAS = "active"


class SlotsTakenError(Exception):
    """The loaded model's slots are taken while another model's requests wait."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class ModelParkedError(Exception):
    """No model is loaded because ``model`` was unloaded for idleness: load it back."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


def resolve_model(
    requested: object, active: str | None, presets: Collection[str], parked: str | None = None
) -> str:
    """The preset a request goes to: ``"active"``/omitted/the active id, else an error
    (:class:`ModelParkedError` when the model it means was unloaded for idleness)."""
    if active is None and parked is not None:
        if requested is None or requested in ("", ACTIVE_ALIAS, parked):
            raise ModelParkedError(parked)
        active = parked  # another preset: as if the parked one were active
    if active is None:
        raise RouterUnavailableError(
            "no model is loaded (the last switch and its rollback failed, or it was "
            "unloaded); switch to a model with POST /admin/switch"
        )
    if requested is None or requested in ("", ACTIVE_ALIAS, active):
        return active
    if not isinstance(requested, str):
        raise ModelNotFoundError("'model' must be a string", param="model")
    if requested not in presets:
        raise ModelNotFoundError.not_a_preset(requested, [ACTIVE_ALIAS, *presets])
    raise ModelNotActiveError(
        f"model {requested!r} is a preset but not the active model ({active!r}); "
        "switch to it first (hotmodel switch / POST /admin/switch), enable "
        "[switch] auto, or send model 'active'",
        param="model",
    )


class Admission:
    """Admission and slot ownership for the requests of every inference endpoint."""

    def __init__(self, services: Services) -> None:
        self.s = services

    @contextlib.asynccontextmanager
    async def admitted(
        self,
        requested: object,
        receive: Receive,
        *,
        owner: str = "",
        admin: bool = False,
        session: SessionRef | None = None,
        tell: Tell | None = None,
    ) -> AsyncIterator[Ticket]:
        """A ticket whose ``model`` is named; auto-switches first when that is enabled (for
        ``session``: its conversation is the one restored or replayed into the model),
        and allowed to this caller (``[switch] auto_access``: its key's access, ``admin``);
        a queued request has its key's priority (``[security] key_priorities``) and is
        told its place (``tell``) while it waits."""
        s, cfg = self.s, self.s.config.switch
        residents = s.controller.residents
        if isinstance(requested, str) and requested in residents.names:
            # a resident is served beside the scheduler: no queue, no switch, and a switch
            # of the active model (its closed gate) does not hold it
            async with s.gate.admit(cfg.queue_timeout_seconds, beside=True) as ticket:
                s.supervisor.ensure_running()
                residents.check_ready(requested)  # a 503 while it is not loaded
                ticket.model = requested
                yield ticket
            return
        deadline = asyncio.get_running_loop().time() + cfg.queue_timeout_seconds
        released = False  # the scheduler let it go: it is admitted, as its batch
        since: float | None = None  # when it first joined a queue: it keeps its place
        # a request that names no model takes whichever is loaded: it never waits for a slot
        # of one model (a switch away would tie it to that model)
        named = requested not in (None, "", ACTIVE_ALIAS)
        while True:
            left = max(0.001, deadline - asyncio.get_running_loop().time())
            async with s.gate.admit(left) as ticket:
                try:
                    ticket.model = self._resolve(requested)
                    if named and not (released or s.scheduler.admits(ticket.model)):
                        # others wait for another model: it waits for a free slot, in
                        # line, so a switch for them drains no more than the slots
                        raise SlotsTakenError(ticket.model)
                except ModelNotActiveError:
                    if not cfg.auto:
                        raise
                    assert isinstance(requested, str)  # "not active" is said only of a preset
                    self._may_switch(admin, requested)
                    target = requested
                except ModelParkedError as parked:
                    target = parked.model  # unloaded for idleness: the request loads it back
                except SlotsTakenError as full:
                    target = full.model
                else:
                    yield ticket
                    return
            # The ticket is returned before the wait: a switch drains in-flight tickets. The
            # request waits in its model's queue; the scheduler switches for the whole queue
            # (and if another switch came first, the request waits again, within its bound).
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            since = s.scheduler.now() if since is None else since
            priority = s.config.keys.priority(owner)
            with anyio.CancelScope() as cancel, DisconnectWatch(receive, cancel) as watch:
                await s.scheduler.wait_for(target, session, left, priority, since, tell)
            if watch.gone:
                raise ClientDisconnect()  # it left while it waited: nobody to answer (a 499)
            released = True

    def _may_switch(self, admin: bool, target: str) -> None:
        if self.s.config.keys.enabled and self.s.config.switch.auto_access == "admin" and not admin:
            raise AutoSwitchForbiddenError(
                f"model {target!r} is not the active model, and only an admin key may switch "
                "([switch] auto_access = \"admin\"); send model 'active' or ask an admin",
                param="model",
            )

    def _resolve(self, requested: object) -> str:
        self.s.supervisor.ensure_running()  # a dead router: say so, with its exit code
        controller = self.s.controller
        return resolve_model(
            requested, controller.active, self.s.config.presets.models, controller.parked
        )

    @contextlib.asynccontextmanager
    async def own_slot(
        self, payload: dict[str, Any], model: str, owner: str
    ) -> AsyncIterator[None]:
        """Hold the key's slot on ``model`` for this request; the prompt cache is reused
        only when the slot holds this key's own prompt (sessions/tenants.py): else
        ``payload`` gets ``cache_prompt: false``, and with keys its ``id_slot`` is the
        key's own."""
        tenants = self.s.sessions.tenants
        timeout = self.s.config.session.queue_timeout_seconds
        keys = self.s.config.keys.enabled
        async with tenants.use(model, owner, timeout) as reuse:
            if not reuse or (keys and self.s.supervisor.ram_cache_shared):
                # another key's prompt is in the slot, or (keys set by a reload, until a
                # restart) llama-server's RAM cache could bring one back
                payload["cache_prompt"] = False
            if keys:
                pinned = tenants.pinned(owner)
                if pinned is None:
                    payload.pop("id_slot", None)  # one slot: nothing to choose
                else:
                    payload["id_slot"] = pinned  # never another key's slot
            yield
