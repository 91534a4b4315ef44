"""Resident companions: presets marked ``resident = true`` stay loaded beside the active one.

A resident (a small embedding or rerank model, a draft model) is loaded at
start and stays loaded whichever model the switches move: it is never a
switch's target nor its "previous" model, so no switch drains or unloads it
(``plan.py`` only ever sees the active model). Its requests are admitted at
once, beside the scheduler (``api/chat.py``). The router counts a place for
each (``router_argv``: ``--models-max`` is ``[router] models_max`` plus the
residents).

:class:`Residents` owns their states; only the control loop's task calls
:meth:`Residents.sync` (a ``SyncResidents`` command, or right after a command
that restarted the router, which took every resident with it). A sync makes
the loaded set match the configured one: it unloads a resident that a reload
removed, and loads each one that is not loaded. A failed load is logged and
kept as the resident's state (``/admin/status``); its requests get a 503
until a later sync loads it; nothing else is touched.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from hotmodel.config import SwitchConfig
from hotmodel.control.execution import summary
from hotmodel.control.ports import LifecycleOps
from hotmodel.errors import HotModelError, ResidentUnavailableError
from hotmodel.presets import Presets

log = logging.getLogger("hotmodel.control")


def residents_to_load(old: Presets, new: Presets) -> tuple[str, ...]:
    """The residents of ``new`` that ``old`` lacked or had otherwise (pure): a router
    started on ``old`` cannot load them as they are now."""
    return tuple(n for n in new.residents if old.models.get(n) != new.models[n])


class ResidentState(enum.Enum):
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"  # its load failed: a later sync (a reload, a recovery) tries again
    LOST = "lost"  # its process ended on its own, or the router restarted: loaded again
    # the running router read an older preset list (a reload added or edited it): it is
    # loaded when the router restarts with the new one
    WAITING = "waiting"


@dataclass(frozen=True, slots=True)
class Resident:
    state: ResidentState
    error: str | None = None
    router: int = 0  # which start of the router it was loaded into (a restart ends it)


class Residents:
    """The resident models and what became of each; written by the control loop only."""

    def __init__(
        self,
        lifecycle: LifecycleOps,
        names: Collection[str] = (),
        preflight: Callable[[str], None] | None = None,
        current: Callable[[str], bool] = lambda name: True,
        generation: Callable[[], int] = lambda: 0,
    ) -> None:
        self.lifecycle = lifecycle
        self.names = frozenset(names)  # configured; a reload replaces them, a sync applies
        self.preflight = preflight  # the GGUF can be read (presets.check_model_file)
        # whether the running router read this preset as configured now
        self.current = current
        # how many times the router was started again: one loaded into an earlier router is
        # gone, even before the sync after the restart says so
        self.generation = generation
        self._states: dict[str, Resident] = {}

    def state(self, name: str) -> Resident | None:
        resident = self._states.get(name)
        if resident is None or resident.state is not ResidentState.LOADED:
            return resident
        return resident if resident.router == self.generation() else Resident(ResidentState.LOST)

    def status(self) -> dict[str, str]:
        """Per resident, its state (``/admin/status``, the dashboard)."""
        out = {name: self.state(name) or Resident(ResidentState.LOADING) for name in self.names}
        return {name: r.state.value for name, r in sorted(out.items())}

    def unloaded(self) -> tuple[str, ...]:
        """The residents configured but not loaded now (policy "auto" counts them: they
        are loaded later, beside whichever model is active then)."""
        loaded = ResidentState.LOADED
        return tuple(
            n for n in sorted(self.names) if getattr(self.state(n), "state", None) != loaded
        )

    def errors(self) -> dict[str, str]:
        """Per resident whose load failed, why."""
        return {n: r.error for n, r in sorted(self._states.items()) if r.error is not None}

    def check_ready(self, name: str) -> None:
        """Raise :class:`ResidentUnavailableError` (503) unless resident ``name`` is loaded."""
        resident = self.state(name)
        if resident is not None and resident.state is ResidentState.LOADED:
            return
        if resident is None or resident.state is ResidentState.LOADING:
            why = "is being loaded"
        elif resident.state is ResidentState.FAILED:
            why = f"failed to load ({resident.error}); a reload or a restart tries again"
        elif resident.state is ResidentState.WAITING:
            why = "waits for the router to read the reloaded presets (at the next switch)"
        else:
            why = "is being loaded again"
        raise ResidentUnavailableError(f"resident model {name!r} {why}; retry later")

    def lost(self, name: str) -> bool:
        """Its process ended without a command asking (a crash): True when it was loaded,
        so that a sync loads it again."""
        resident = self.state(name)
        if resident is None or resident.state is not ResidentState.LOADED:
            return False
        self._states[name] = Resident(ResidentState.LOST)
        log.warning("the process of resident %r ended on its own; loading it again", name)
        return True

    async def sync(self, config: SwitchConfig, restarted: bool = False) -> list[str]:
        """Make the loaded residents the configured ones; the errors of those that failed.
        ``restarted``: the router was started again, so none of them is loaded now."""
        errors = []
        for name in sorted(set(self._states) - self.names):
            try:
                await self.lifecycle.unload(name, config.unload_timeout_seconds)
            except HotModelError as exc:
                errors.append(f"unloading resident {name!r} failed: {summary(exc)}")
                log.warning("%s", errors[-1])
            else:
                log.info("resident %r unloaded (no longer configured)", name)
            del self._states[name]  # no longer ours either way: a restart ends it
        if restarted:
            self._states = {n: Resident(ResidentState.LOST) for n in self._states}
        for name in sorted(self.names):
            resident = self.state(name)
            if resident is not None and resident.state is ResidentState.LOADED:
                continue
            error = await self._load(name, config)
            if error is not None:
                errors.append(error)
        return errors

    async def _load(self, name: str, config: SwitchConfig) -> str | None:
        if not self.current(name):
            self._states[name] = Resident(ResidentState.WAITING)
            log.info("resident %r is loaded when the router reads the reloaded presets", name)
            return None
        self._states[name] = Resident(ResidentState.LOADING)
        try:
            if self.preflight is not None:
                self.preflight(name)
            await self.lifecycle.load(name, config.load_timeout_seconds)
        except HotModelError as exc:
            error = summary(exc)
            self._states[name] = Resident(ResidentState.FAILED, error)
            log.error("resident %r failed to load: %s", name, exc)
            try:  # a load that timed out may still be on its way: it must not stay half-done
                await self.lifecycle.unload(name, config.unload_timeout_seconds)
            except HotModelError as again:
                log.warning("resident %r: unloading after its failed load: %s", name, again)
            return f"resident {name!r} failed to load: {error}"
        self._states[name] = Resident(ResidentState.LOADED, router=self.generation())
        log.info("resident %r loaded", name)
        return None
