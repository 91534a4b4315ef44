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
    n_messages: int
    messages_hash: str


class SlotLedger:
    """Which session's prompt each model's (single) slot holds; None: unknown or none."""

    def __init__(self) -> None:
        self._slots: dict[str, Covered | None] = {}

    def touch(self, model: str) -> None:
        """A request that is not a session's turn went through: the slot is someone else's."""
        self._slots[model] = None

    def cover(self, model: str, owner: str, session_id: str, messages: Sequence[Message]) -> None:
        self._slots[model] = Covered(owner, session_id, len(messages), messages_hash(messages))

    def get(self, model: str) -> Covered | None:
        return self._slots.get(model)
