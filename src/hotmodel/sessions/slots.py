"""Which session's prompt each model's slot holds (one slot per model: ``parallel = 1``).

The chat path and the replay tell the ledger after every request; KV snapshots
use it to label what they save. A request that is not a session's turn makes
the slot anonymous: it is then not saved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from hotmodel.sessions.context import Message


def messages_hash(messages: Sequence[Message]) -> str:
    return hashlib.sha256(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Covered:
    """What a model's slot holds: the messages of one session's last request."""

    owner: str
    session_id: str
    messages: tuple[Message, ...]  # read-only, as every session message is

    @property
    def n_messages(self) -> int:
        return len(self.messages)

    @property
    def messages_hash(self) -> str:
        # Hashed when a snapshot is labelled, not on every turn: most turns are never saved.
        return messages_hash(self.messages)


class SlotLedger:
    """Which session's prompt each model's (single) slot holds; None: unknown or none.

    Every request on a model takes a new generation number when it starts; its
    label is recorded only if no other request on that model started since
    (llama-server would have run that one after it, over the same slot).
    """

    def __init__(self) -> None:
        self._slots: dict[str, Covered | None] = {}
        self._gen: dict[str, int] = {}

    def touch(self, model: str) -> int:
        """A request on ``model`` starts: the slot is nobody's until it is labelled."""
        self._gen[model] = self._gen.get(model, 0) + 1
        self._slots[model] = None
        return self._gen[model]

    def latest(self, model: str) -> int:
        """The generation of the last request that started on ``model`` (0: none yet)."""
        return self._gen.get(model, 0)

    def cover(
        self, model: str, gen: int, owner: str, session_id: str, messages: Sequence[Message]
    ) -> Covered | None:
        """Label ``model``'s slot with what request ``gen`` sent, unless another request
        started since; the label, or None when it was not written."""
        if self._gen.get(model) != gen:
            return None
        covered = Covered(owner, session_id, tuple(messages))
        self._slots[model] = covered
        return covered

    def forget(self, owner: str, session_id: str) -> None:
        """The session was deleted: no slot may be saved under its name any more."""
        for model, covered in self._slots.items():
            if covered is not None and (covered.owner, covered.session_id) == (owner, session_id):
                self._slots[model] = None

    def get(self, model: str) -> Covered | None:
        return self._slots.get(model)
