"""A stored session and its messages, as the store reads them and its cache keeps them.

Plain values apart from :mod:`hotmodel.sessions.store`, so that the store's
in-memory window (:mod:`hotmodel.sessions.cache`) can hold them without
importing the store that owns it (no import circle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StoredMessage:
    message: dict[str, Any]
    model: str | None
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {**self.message, "model": self.model, "created_at": self.created_at}


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    system_prompt: str
    created_at: float
    updated_at: float
    messages: tuple[StoredMessage, ...] = ()
    owner: str = ""  # the fingerprint of the API key that created it (never shown)
    offset: int = 0  # earlier messages not read (a window of the last ones was asked for)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "system_prompt": self.system_prompt or None,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "messages": [m.to_json() for m in self.messages],
        }
