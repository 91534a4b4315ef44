"""The store's write-through window cache: what a turn reads from memory is what the store
holds (SQLite and PostgreSQL alike: the ``store`` fixture runs each test on both)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from hotmodel.sessions.cache import WindowCache
from hotmodel.sessions.context import Message, reconcile
from hotmodel.sessions.sqlite import SqliteStore
from hotmodel.sessions.store import Session, StoredMessage
from tests.conftest import Stores


def u(text: str) -> Message:
    return {"role": "user", "content": text}


def a(text: str) -> Message:
    return {"role": "assistant", "content": text}


def _same(cached: Session | None, read: Session | None) -> None:
    assert cached is not None and read is not None
    assert cached == read  # header, offset, and every message with its model and time


def test_the_cache_gives_what_the_store_holds_as_a_session_grows(store: Stores) -> None:
    async def scenario() -> None:
        async with store() as s:
            await s.append(
                "", "s", [m for i in range(50) for m in (u(f"q{i}"), a(f"a{i}"))], "m", ""
            )
            assert await s.get("", "s", 30) is not None  # read from the store, now cached
            for i in range(20):
                # what the service does: read a window, store the new turn and its answer
                window = 30 + i % 3  # windows of other sizes than the one cached
                before = s.cache.hits
                cached = await s.get("", "s", window)
                assert s.cache.hits == before + 1 or window > 30
                async with store() as other:  # a second connection (or node): uncached
                    read = await other.get("", "s", window)
                _same(cached, read)
                await s.append("", "s", [u(f"n{i}"), a(f"r{i}")], f"model{i}", f"p{i % 2}")
            assert len(s.cache) == 1
            async with store() as other:
                _same(await s.get("", "s", 5), await other.get("", "s", 5))

    asyncio.run(scenario())


def test_a_short_session_is_read_whole_from_the_cache(store: Stores) -> None:
    async def scenario() -> None:
        async with store() as s:
            await s.append("", "s", [u("hi"), a("hello")], "m", "")
            first = await s.get("", "s", 100)
            await s.append("", "s", [u("again"), a("yes")], "m", "")
            hits = s.cache.hits
            second = await s.get("", "s", 100)
            assert s.cache.hits == hits + 1
            assert first is not None and second is not None and second.offset == 0
            assert [m.message for m in second.messages] == [
                u("hi"),
                a("hello"),
                u("again"),
                a("yes"),
            ]
            assert second.created_at == first.created_at and second.updated_at > first.updated_at

    asyncio.run(scenario())


def test_a_rewind_replaces_the_end_of_a_session_in_the_store_and_in_the_cache(
    store: Stores,
) -> None:
    async def scenario() -> None:
        async with store() as s:
            await s.append("", "s", [u("hi"), a("hello"), u("q"), a("first")], "m", "")
            assert await s.get("", "s", 10) is not None  # cached
            # a regenerated answer: the stored one (seq 3) is replaced, in one transaction
            await s.append("", "s", [a("second")], "m2", "", rewind=3)
            cached = await s.get("", "s", 10)
            async with store() as other:
                read = await other.get("", "s", 10)
            _same(cached, read)
            assert read is not None
            assert [m.message for m in read.messages] == [u("hi"), a("hello"), u("q"), a("second")]
            assert read.messages[-1].model == "m2"

    asyncio.run(scenario())


def test_another_connections_write_empties_the_cache(tmp_path: Path) -> None:
    """A tool (or the benchmark) writing the file directly is seen on the next read."""
    path = tmp_path / "s.sqlite3"

    async def scenario() -> None:
        async with SqliteStore(path) as store:
            await store.append("", "s", [u("hi"), a("hello")], "m", "")
            assert await store.get("", "s", 10) is not None
            conn = sqlite3.connect(path)
            conn.execute(
                "INSERT INTO messages VALUES ('', 's', 2, 'user', '{\"role\": \"user\", "
                '"content": "outside"}\', NULL, 1.0)'
            )
            conn.commit()
            conn.close()
            session = await store.get("", "s", 10)
            assert session is not None
            assert [m.message["content"] for m in session.messages] == ["hi", "hello", "outside"]
            await store.append("", "s", [a("seen")], "m", "")  # after it, not over it
            session = await store.get("", "s", 10)
            assert session is not None and session.messages[-1].message == a("seen")
            assert len(session.messages) == 4

    asyncio.run(scenario())


def test_delete_drops_the_cached_session(store: Stores) -> None:
    async def scenario() -> None:
        async with store() as s:
            await s.append("", "s", [u("hi"), a("hello")], "m", "")
            assert await s.get("", "s", 10) is not None
            assert await s.delete("", "s")
            assert len(s.cache) == 0 and await s.get("", "s", 10) is None
            await s.append("", "s", [u("new")], "m", "")  # the id starts over
            session = await s.get("", "s", 10)
            assert session is not None and [m.message for m in session.messages] == [u("new")]

    asyncio.run(scenario())


def test_cached_messages_are_the_stores_own(store: Stores) -> None:
    """The caller's dicts are not kept: what is cached is what a read would decode."""

    async def scenario() -> None:
        async with store() as s:
            await s.append("", "s", [u("hi")], "m", "")
            assert await s.get("", "s", 10) is not None
            turn: Message = {
                "role": "user",
                "content": [{"type": "text", "text": "x"}],
                "n": (1, 2),
            }
            await s.append("", "s", [turn], "m", "")
            turn["content"] = "changed"
            session = await s.get("", "s", 10)
            assert session is not None
            assert session.messages[-1].message == {
                "role": "user",
                "content": [{"type": "text", "text": "x"}],
                "n": [1, 2],
            }

    asyncio.run(scenario())


def _session(sid: str, n: int, offset: int = 0) -> Session:
    messages = tuple(StoredMessage(u(f"m{offset + i}"), None, 0.0) for i in range(n))
    return Session(sid, "", 0.0, 0.0, messages, "", offset)


def test_the_cache_is_bounded_least_recently_used_out() -> None:
    cache = WindowCache(max_sessions=2, max_bytes=10**9)
    for sid in ("a", "b", "c"):
        cache.put(_session(sid, 3), [1, 1, 1], 3)
    assert cache.get("", "a", 3) is None and cache.get("", "c", 3) is not None
    small = WindowCache(max_sessions=10, max_bytes=2500)
    small.put(_session("a", 2), [1000, 1000], 2)
    small.put(_session("b", 2), [1000, 1000], 2)  # over the byte bound: 'a' goes
    assert len(small) == 1 and small.get("", "b", 2) is not None


def test_a_window_longer_than_the_cached_one_is_a_miss() -> None:
    cache = WindowCache()
    cache.put(_session("a", 3, offset=7), [1] * 3, 3)
    assert cache.get("", "a", 4) is None  # the 7 earlier messages are not cached
    hit = cache.get("", "a", 2)
    assert hit is not None and hit.offset == 8
    assert [m.message for m in hit.messages] == [u("m8"), u("m9")]


def test_new_turns_compares_only_the_overlap_it_can_have() -> None:
    stored = [u(f"q{i}") if i % 2 == 0 else a(f"a{i}") for i in range(200)]
    assert reconcile(stored, [u("next")]).turns == [u("next")]
    assert reconcile(stored, [*stored[-3:], u("next")]).turns == [u("next")]
    assert reconcile(stored, stored[-1:]).turns == []
    assert reconcile(stored, [*stored, u("next")]).turns == [u("next")]
