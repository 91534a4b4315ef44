"""The durable session store: one interface, two backends, chosen by ``[store] url``.

A session is an id, the name of its system prompt and its ordered messages
(each the OpenAI message object as sent or received, the model that produced
an assistant turn, and the time). The store never shortens a session:
bounds apply only to what is sent to a model. A session is created by its
first stored turns (``append``), never by a read, so a request that is
refused leaves no trace.

:class:`SessionStore` is what the rest of hotmodel sees; :func:`open_store`
makes the one the config selects: SQLite (:mod:`hotmodel.sessions.sqlite`,
the embedded default: one file under the state folder) or PostgreSQL
(:mod:`hotmodel.sessions.postgres`, shared by several nodes). Both keep the
last messages of recent sessions in memory (:mod:`hotmodel.sessions.cache`),
both map every library error to :class:`~hotmodel.errors.StoreError` at one
place, and both keep Responses beside sessions (``responses``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

from hotmodel.config import Config
from hotmodel.sessions.cache import WindowCache
from hotmodel.sessions.postgres import PostgresStore
from hotmodel.sessions.records import CHAIN_PREFIX as CHAIN_PREFIX
from hotmodel.sessions.records import Limits as Limits
from hotmodel.sessions.records import Page as Page
from hotmodel.sessions.records import Session as Session
from hotmodel.sessions.records import SessionSummary as SessionSummary
from hotmodel.sessions.records import StoredMessage as StoredMessage
from hotmodel.sessions.records import is_chain as is_chain
from hotmodel.sessions.responses import ResponseRows
from hotmodel.sessions.sqlite import SqliteStore


class SessionStore(Protocol):
    """Sessions and stored Responses, whichever the backend. Open with ``async with``."""

    cache: WindowCache

    @property
    def responses(self) -> ResponseRows: ...

    async def __aenter__(self) -> SessionStore: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def turn_lock(
        self, owner: str, session_id: str, timeout: float
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the session for a whole turn against other nodes sharing the store
        (PostgreSQL: a session advisory lock; SQLite: nothing). Waits at most
        ``timeout`` seconds, then :class:`~hotmodel.errors.SessionBusyError`."""
        ...

    async def get(self, owner: str, session_id: str, last: int | None = None) -> Session | None:
        """The session; with ``last``, only its last ``last`` messages (``offset`` says how
        many came before), so a turn costs the same at any history length."""
        ...

    async def append(
        self,
        owner: str,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        model: str | None,
        system_prompt: str,
        rewind: int | None = None,
        limits: Limits | None = None,
    ) -> None:
        """Append turns atomically, creating the session if it is new (``rewind``: the
        stored messages from that seq on are replaced); past ``limits`` nothing is
        written (:class:`SessionLimitError`, :class:`SessionFullError`), checked so that
        concurrent writers cannot both take the last place."""
        ...

    async def list(self, owner: str) -> list[SessionSummary]: ...

    async def page(
        self, owner: str, limit: int | None, after: str | None = None
    ) -> Page | None: ...

    async def owned(self, owner: str) -> int: ...

    async def unused_since(self, cutoff: float) -> tuple[tuple[str, str], ...]: ...

    async def prompt_use(self) -> dict[str, int]: ...

    async def count(self) -> int: ...

    async def most_recent(self, last: int | None = None) -> Session | None: ...

    async def delete(
        self, owner: str, session_id: str, unused_before: float | None = None
    ) -> bool: ...


def open_store(config: Config) -> SessionStore:
    """The store ``config`` selects, not yet open (enter it with ``async with``):
    PostgreSQL when ``[store] url`` is set, else the SQLite file."""
    if config.store.url:
        return PostgresStore(config.store.url, config.store.pool_size, config.store.lock_pool_size)
    return SqliteStore(config.session_store_file)
