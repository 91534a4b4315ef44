"""The commands of the control loop: every change of the router's model set, and of what
the engine reads of the configuration, is one of these, run in order by one task.

The engine takes the command itself (``Engine.execute``): what to do is the command's
type, not a set of flags. The controller (``controller.py``) queues them, joins
commands with the same outcome, and runs :class:`Reconfigure` (which is about the
engine's settings, and may load the active model again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hotmodel.config import Config
from hotmodel.sessions.service import SessionRef


@dataclass(frozen=True, slots=True)
class Switch:
    """Make ``target`` the active model. ``replay_session=False`` skips the replay
    (the first load at start, where no conversation is waiting). ``session``: the
    conversation the switch is for, restored or replayed into the new model (None:
    the most recently used one); commands that join one switch keep the first's."""

    target: str
    replay_session: bool = True
    reload: bool = False  # load it again even if active (a reload changed its preset)
    session: SessionRef | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Unload:
    """Unload the active model: afterwards no model is loaded. ``idle_after``: an idle
    unload, done only if no request came for that many seconds; the model is then
    parked and the next request loads it back."""

    idle_after: float | None = None


@dataclass(frozen=True, slots=True)
class Recover:
    """The router or the model's child died: restart the router if it is down, then load
    ``target`` again and replay the most recent session (None: no model was loaded, so
    only the router comes back)."""

    target: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Keep the active model's KV snapshot, change nothing (at stop, so that the next
    start finds the conversation in the cache)."""


@dataclass(frozen=True, slots=True)
class Reconfigure:
    """A config reload: the engine reads ``config`` from now on (between two runs, never
    during one), and the router gets its presets at its next restart. ``reload``: the
    active model, whose own preset changed, is loaded again with it in the same command;
    if that fails, ``previous`` (the configuration it replaced) comes back, ``revert``
    puts back the rest of it (outside the engine), and the model is loaded again."""

    config: Config
    previous: Config = field(compare=False)
    reload: str | None = None
    revert: Callable[[], None] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class SyncResidents:
    """Load every resident model (``resident = true``) that is not loaded, unload those
    no longer configured; ``lost``: this one's process ended on its own (load it again)."""

    lost: str | None = None


EngineCommand = Switch | Unload | Recover | Snapshot  # what ``Engine.execute`` takes
Reporting = EngineCommand | SyncResidents  # every command that ends with a report
Command = Reporting | Reconfigure
