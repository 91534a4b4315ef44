"""A stored session and its messages, as every store reads them and its cache keeps them.

Plain values apart from the stores (:mod:`hotmodel.sessions.sqlite`,
:mod:`hotmodel.sessions.postgres`), so that both share them and the in-memory
window (:mod:`hotmodel.sessions.cache`) can hold them without importing the
store that owns it (no import circle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hotmodel.errors import SessionFullError


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


@dataclass(frozen=True, slots=True)
class SessionSummary:
    id: str
    system_prompt: str
    created_at: float
    updated_at: float
    message_count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "system_prompt": self.system_prompt or None,
            "messages": self.message_count,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Page:
    """One page of an owner's sessions, and whether more follow it."""

    sessions: list[SessionSummary]
    has_more: bool


@dataclass(frozen=True, slots=True)
class Limits:
    """What one owner may keep (0: no bound): sessions, and messages per session."""

    sessions: int = 0
    messages: int = 0

    def check_messages(
        self, session_id: str, stored: int | None, adding: int, rewind: int | None
    ) -> None:
        """Raise :class:`SessionFullError` if ``adding`` messages to the ``stored`` ones
        (None: a new session), after ``rewind``, would pass the message bound."""
        total = ((stored or 0) if rewind is None else rewind) + adding
        if self.messages and total > self.messages:
            raise SessionFullError.over(session_id, total, self.messages)


# A session whose id starts so holds an OpenAI Responses chain's conversation
# (sessions/responses.py: what a switch restores or replays for it). No client names one
# (a session id has no spaces), and they do not count against [session]
# max_sessions_per_key: one-off Responses requests must not crowd out a key's chats.
CHAIN_PREFIX = "responses "
# the SQL condition (SQLite's and PostgreSQL's alike) that leaves chains out of a count
NOT_A_CHAIN = "AND substr(id, 1, 10) != 'responses ' "


def is_chain(session_id: str) -> bool:
    """Whether ``session_id`` is a Responses chain's (:data:`CHAIN_PREFIX`)."""
    return session_id.startswith(CHAIN_PREFIX)
