"""One writer per session: a lock per session id, held from prepare until the answer is stored.

Two concurrent requests on one session would both read the same history and
store their turns interleaved; holding the session's lock for the whole turn
serializes them (the second sees the first's turn), while requests on
different sessions stay concurrent. Locks exist only while someone holds or
waits for them, so idle sessions cost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from hotmodel.errors import SessionBusyError

SETTING = "[session] queue_timeout_seconds"


def busy(session_id: str, timeout: float) -> SessionBusyError:
    """The 409 of a turn that waited ``timeout`` seconds for its session's lock."""
    return SessionBusyError(
        f"another request on session {session_id!r} is still running after "
        f"{timeout:g}s ({SETTING})",
        param="session_id",
    )


class SessionLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str, timeout: float) -> AsyncIterator[None]:
        """Hold ``session_id``'s lock for the block; wait at most ``timeout`` seconds for it."""
        lock, users = self._locks.get(session_id, (asyncio.Lock(), 0))
        self._locks[session_id] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(timeout):
                    await lock.acquire()
            except TimeoutError:
                raise busy(session_id.rpartition("\0")[2], timeout) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)
