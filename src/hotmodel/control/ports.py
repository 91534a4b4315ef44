"""What the engine needs from the outside world, as interfaces (``typing.Protocol``).

The real implementations: ``router.lifecycle.ModelLifecycle`` (LifecycleOps),
``router.supervisor.RouterSupervisor`` (ProcessOps), ``control.snapshots.Snapshots``
(KvOps) and ``SessionService.replay`` (Replayer). Unit tests pass recording fakes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from hotmodel.config import Config
from hotmodel.presets import Presets
from hotmodel.sessions.service import SessionRef


class LifecycleOps(Protocol):
    """The model lifecycle on the router: load and unload, idempotent, awaited to the end."""

    async def load(self, model: str, timeout: float) -> bool:
        """Load and wait for ``loaded``; False when it was running already."""
        ...

    async def unload(self, model: str, timeout: float, background: bool = False) -> bool:
        """Unload and wait for ``unloaded`` (``background``: leave that wait to
        :meth:`exited`); False when it was not running."""
        ...

    async def exited(self) -> None:
        """Wait for the models unloaded in the background to be gone (never raises)."""
        ...

    @property
    def exiting(self) -> frozenset[str]:
        """The models unloaded in the background whose process has not exited yet."""
        ...


class ProcessOps(Protocol):
    """The router process."""

    @property
    def running(self) -> bool: ...

    @property
    def stale(self) -> bool:
        """The router runs with a preset list that a reload has since replaced."""
        ...

    async def restart(self) -> None:
        """Start the router again (bounded attempts); RouterError when it cannot."""
        ...

    def use_presets(self, presets: Presets) -> None:
        """A reload's presets: the router reads them at its next restart."""
        ...


class SnapshotShare(Protocol):
    """A cluster's index of its nodes' KV snapshots (``cluster/kv_share.py``): a node that
    has none of a session's snapshots fetches another node's, when it is valid here."""

    async def publish(self, kept: Sequence[Mapping[str, Any]]) -> None:
        """This node's snapshots now (each a sidecar's fields plus its ``portable``
        identity): the index is made to hold exactly these for this node."""
        ...

    async def fetch(
        self, model: str, owner: str, session_id: str, portable: Mapping[str, str], into: Path
    ) -> dict[str, Any] | None:
        """Another live node's newest snapshot of this session for ``model`` whose portable
        identity is ``portable``, downloaded to ``into`` and its sha256 checked: its
        sidecar's fields; None when no node has one, or none could be fetched."""
        ...


class KvOps(Protocol):
    """KV snapshots of a model's slot."""

    async def save(
        self, model: str, restoring: str | None = None, session: SessionRef | None = None
    ) -> dict[str, Any] | None:
        """Keep ``model``'s slot; None when it holds no session's prompt. ``restoring``:
        the model the same command restores next (for ``session``, else the most recent
        one), whose snapshot is not evicted for it."""
        ...

    async def restore(self, model: str, session: SessionRef | None = None) -> dict[str, Any] | None:
        """Bring back ``session``'s snapshot (None: the most recently used session's);
        ``restored`` says whether it did."""
        ...

    def configure(self, config: Config) -> None:
        """A reload's configuration (a preset's options count in a snapshot's identity;
        a lowered budget applies at once)."""
        ...

    def proved(self, model: str, cached: int, session_id: str | None) -> bool | None:
        """The replay right after a restore (of ``session_id``'s conversation) found
        ``cached`` prompt tokens in the cache: whether the restore took (None: none waits,
        or the replay was another session's)."""
        ...

    def ensure_folder(self) -> None:
        """The folder llama-server is started with (``--slot-save-path``) exists: a model
        does not load without it."""
        ...


# prefill ``session``'s conversation (None: the most recently used one) into the model
Replayer = Callable[[str, SessionRef | None], Awaitable[dict[str, Any] | None]]
