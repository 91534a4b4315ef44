"""The last messages of recently used sessions, kept in memory by the store (write-through).

A turn reads a window of its session's last messages. From SQLite that is a
query and a JSON decode per message on every turn; from here it is a slice.
The store is the only writer of what is cached: its ``append`` extends an
entry after the commit, ``delete`` drops it. What another writer commits is
seen too: on SQLite a commit by any other connection (``PRAGMA data_version``)
empties the whole cache; on PostgreSQL each entry keeps its session's
``version`` (a number from one sequence, new on every append) and a read
compares it with the session row it reads anyway, so a turn that follows
another node's append never gets a stale window. Only the store's thread (or
its event loop) touches it, so it needs no lock.

An entry holds the window last asked for (at least): the largest ``last`` a
read wanted, or all of a short session. Entries are bounded in number and in
size, least recently used out first. Cached messages are shared between
reads: callers treat them as read-only, as they always have.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from hotmodel.sessions.records import Session, StoredMessage

MAX_SESSIONS = 128
MAX_BYTES = 8 * 1024 * 1024
# Python's own cost of a small message (dicts, strings, the StoredMessage), on top of
# its JSON length: without it thousands of short messages would look free.
MESSAGE_OVERHEAD = 512


@dataclass(slots=True)
class _Entry:
    session: Session  # its messages are the cached window; ``offset`` counts those before
    sizes: list[int]  # each cached message's cost in bytes (JSON length + overhead)
    keep: int  # the largest window asked for: appends trim to it
    version: int = 0  # the session's version when cached (PostgreSQL; 0 on SQLite)


def cost(json_length: int) -> int:
    return json_length + MESSAGE_OVERHEAD


class WindowCache:
    def __init__(self, max_sessions: int = MAX_SESSIONS, max_bytes: int = MAX_BYTES) -> None:
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, owner: str, session_id: str, last: int, version: int | None = None
    ) -> Session | None:
        """The session with its last ``last`` messages, as a read from the store would give
        it; None when it is not cached, the cached window is shorter, or (with
        ``version``) it was cached at another version of the session (then dropped)."""
        entry = self._entries.get((owner, session_id))
        if entry is not None and version is not None and entry.version != version:
            self.drop(owner, session_id)
            entry = None
        if entry is None or (len(entry.session.messages) < last and entry.session.offset > 0):
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end((owner, session_id))
        entry.keep = max(entry.keep, last)
        session = entry.session
        extra = len(session.messages) - last
        if extra <= 0:
            return session
        return dataclasses.replace(
            session, messages=session.messages[extra:], offset=session.offset + extra
        )

    def put(self, session: Session, sizes: Sequence[int], last: int, version: int = 0) -> None:
        """Cache ``session`` as just read: its last ``last`` messages (or all it has)."""
        self.drop(session.owner, session.id)
        entry = _Entry(session, list(sizes), last, version)
        self._entries[(session.owner, session.id)] = entry
        self._bytes += sum(entry.sizes)
        self._evict()

    def appended(
        self,
        key: tuple[str, str],
        header: tuple[str, float],
        first_seq: int,
        messages: Sequence[StoredMessage],
        sizes: Sequence[int],
        version: tuple[int, int] = (0, 0),
    ) -> None:
        """``messages`` were committed to session ``key`` (owner, id) from seq ``first_seq``
        on, and ``header`` (system prompt, updated_at) with them: a cached entry grows,
        then is trimmed to its window. ``version``: the session's (before, after) the
        append; an entry cached at another version than ``before`` is dropped."""
        entry = self._entries.get(key)
        if entry is None:
            return  # not cached: the next read fills it
        if entry.version != version[0]:
            self.drop(*key)  # another writer came in between: the next read fills it
            return
        cached = entry.session
        if cached.offset + len(cached.messages) != first_seq:
            self.drop(*key)  # cannot happen while the store is the only writer: be safe
            return
        window = (*cached.messages, *messages)
        entry.sizes += sizes
        cut = max(0, len(window) - entry.keep)
        self._bytes += sum(sizes) - sum(entry.sizes[:cut])
        del entry.sizes[:cut]
        entry.session = dataclasses.replace(
            cached,
            system_prompt=header[0],
            updated_at=header[1],
            messages=window[cut:],
            offset=cached.offset + cut,
        )
        entry.version = version[1]
        self._entries.move_to_end(key)
        self._evict()

    def drop(self, owner: str, session_id: str) -> None:
        entry = self._entries.pop((owner, session_id), None)
        if entry is not None:
            self._bytes -= sum(entry.sizes)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _evict(self) -> None:
        while self._entries and (
            len(self._entries) > self.max_sessions or self._bytes > self.max_bytes
        ):
            _, entry = self._entries.popitem(last=False)
            self._bytes -= sum(entry.sizes)
