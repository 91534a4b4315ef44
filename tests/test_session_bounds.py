"""Bounds on the session store, against a real hotmodel and llama-server: sessions per API
key, messages per session, retention, paging through GET /v1/sessions (and the CLI
following the pages), and system prompts that stored sessions still use."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from hotmodel.config import load_config
from hotmodel.router.client import RouterClient
from hotmodel.security import fingerprint
from hotmodel.sessions.postgres import PostgresStore
from hotmodel.sessions.retention import Retention, sweep_due
from hotmodel.sessions.service import SessionService
from hotmodel.sessions.sqlite import SqliteStore
from hotmodel.sessions.store import SessionStore
from tests.conftest import (
    HotmodelProcess,
    Stores,
    bearer,
    chat,
    run_hotmodel,
    start_hotmodel,
    user,
    write_config,
)

pytestmark = pytest.mark.slow  # drives the real llama-server

ADMIN = "admin-key-bounds-000000"
KEY_A = "client-key-bounds-aaaaaa"  # the session count bound
KEY_B = "client-key-bounds-bbbbbb"  # another key: its own bound
KEY_C = "client-key-bounds-cccccc"  # the message bound
KEY_D = "client-key-bounds-dddddd"  # many sessions (stored before start): pages
KEY_E = "client-key-bounds-eeeeee"  # system prompts and retention
PAGED = 105  # KEY_D's sessions: more than the CLI's first (default) page of 100
PROMPTS = (
    '[system_prompts.pirate]\nsystem = "Talk like a pirate."\n'
    '[system_prompts.unused]\nsystem = "Nobody uses this one."\n'
)
DAY_S = 86400.0


async def _age(store: Stores, db: SessionStore, when: float) -> None:
    """Every session last used at ``when`` (written outside the store, as a tool would)."""
    if isinstance(db, SqliteStore):
        with sqlite3.connect(db.path) as conn:
            conn.execute("UPDATE sessions SET updated_at = ?", (when,))
        conn.close()
    else:
        assert isinstance(db, PostgresStore)
        async with db.connection() as pg:
            await pg.execute("UPDATE sessions SET updated_at = %s", (when,))


def _prefill(path: Path, now: float) -> None:
    """Sessions stored before the server starts: KEY_D's many (their times in groups of
    three equal ones: ties), and KEY_E's old one, one whose prompt is gone, one with pirate."""

    async def fill() -> None:
        async with SqliteStore(path) as store:
            pair = [user("hi"), {"role": "assistant", "content": "hello"}]
            for i in range(PAGED):
                await store.append(fingerprint(KEY_D), f"p{i:03d}", pair, "tiny", "")
            e = fingerprint(KEY_E)
            await store.append(e, "old", pair, "tiny", "")
            await store.append(e, "lost-prompt", pair, "tiny", "gone")
            await store.append(e, "piratey", pair, "tiny", "pirate")

    asyncio.run(fill())
    with sqlite3.connect(path) as db:
        for i in range(PAGED):
            db.execute(
                "UPDATE sessions SET updated_at = ? WHERE id = ?",
                (now - 1000 + i // 3, f"p{i:03d}"),
            )
        db.execute("UPDATE sessions SET updated_at = ? WHERE id = 'old'", (now - 2 * DAY_S,))
    db.close()


@pytest.fixture(scope="module")
def bounded(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    folder = tmp_path_factory.mktemp("bounds")
    keys = ", ".join(f'"{k}"' for k in (KEY_A, KEY_B, KEY_C, KEY_D, KEY_E))
    config = write_config(
        folder,
        {"tiny": tiny_models["tiny"]},
        "tiny",
        session="max_sessions_per_key = 3\nmax_stored_messages = 4\nretention_days = 1",
        tail=f'{PROMPTS}[security]\napi_keys = [{keys}]\nadmin_keys = ["{ADMIN}"]\n',
    )
    _prefill(load_config(config).session_store_file, time.time())
    hp = start_hotmodel(config)
    yield hp
    assert hp.stop() == 0, hp.output()


def session_of(hp: HotmodelProcess, key: str, session: str) -> httpx.Response:
    return httpx.get(f"{hp.base_url}/v1/sessions/{session}", headers=bearer(key))


def listing(hp: HotmodelProcess, key: str, **query: Any) -> httpx.Response:
    return httpx.get(hp.base_url + "/v1/sessions", params=query, headers=bearer(key))


def assert_error(resp: httpx.Response, status: int, code: str, param: str | None) -> str:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)
    return str(error["message"])


def test_a_new_session_past_the_bound_of_its_key_is_refused(bounded: HotmodelProcess) -> None:
    for sid in ("a1", "a2", "a3"):
        assert chat(bounded, key=KEY_A, session_id=sid).status_code == 200
    refused = chat(bounded, key=KEY_A, session_id="a4")
    message = assert_error(refused, 409, "session_limit_reached", "session_id")
    assert "3 sessions" in message and "max_sessions_per_key" in message
    assert "DELETE /v1/sessions/{id}" in message
    streamed = chat(bounded, key=KEY_A, session_id="a4", stream=True)  # refused before a stream
    assert_error(streamed, 409, "session_limit_reached", "session_id")
    assert session_of(bounded, KEY_A, "a4").status_code == 404  # nothing stored
    assert len(listing(bounded, KEY_A).json()["data"]) == 3
    assert chat(bounded, key=KEY_A, session_id="a1").status_code == 200  # existing ones go on
    assert chat(bounded, key=KEY_B, session_id="a4").status_code == 200  # per key
    # KEY_D holds more than the bound (stored before): none of its sessions is lost, no new one
    assert_error(
        chat(bounded, key=KEY_D, session_id="new"), 409, "session_limit_reached", "session_id"
    )
    assert httpx.delete(bounded.base_url + "/v1/sessions/a3", headers=bearer(KEY_A)).is_success
    assert chat(bounded, key=KEY_A, session_id="a4").status_code == 200  # room again


def test_a_turn_past_the_message_bound_is_refused(bounded: HotmodelProcess) -> None:
    assert chat(bounded, key=KEY_C, session_id="c1", messages=[user("one")]).status_code == 200
    assert chat(bounded, key=KEY_C, session_id="c1", messages=[user("two")]).status_code == 200
    kept = session_of(bounded, KEY_C, "c1").json()["messages"]
    assert len(kept) == 4
    message = assert_error(
        chat(bounded, key=KEY_C, session_id="c1", messages=[user("three")]),
        409,
        "session_full",
        "session_id",
    )
    assert "6 messages" in message and "bound of 4" in message
    assert session_of(bounded, KEY_C, "c1").json()["messages"] == kept  # nothing stored
    # a regenerate (the conversation up to the last question) replaces the last answer: room
    resend = [{"role": m["role"], "content": m["content"]} for m in kept[:3]]
    assert chat(bounded, key=KEY_C, session_id="c1", messages=resend).status_code == 200
    assert len(session_of(bounded, KEY_C, "c1").json()["messages"]) == 4


def test_the_list_pages_most_recently_used_first(bounded: HotmodelProcess) -> None:
    # stored with updated_at = base + i // 3: newest first, equal times by id
    expected = sorted((f"p{i:03d}" for i in range(PAGED)), key=lambda s: (-(int(s[1:]) // 3), s))
    first = listing(bounded, KEY_D).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [s["id"] for s in first["data"]] == expected[:100]  # the default page
    assert (first["first_id"], first["last_id"]) == (expected[0], expected[99])
    assert set(first["data"][0]) == {"id", "system_prompt", "messages", "created_at", "updated_at"}
    assert first["data"][0]["messages"] == 2
    seen: list[str] = []
    after: str | None = None
    while True:
        page = listing(bounded, KEY_D, limit=7, **({"after": after} if after else {})).json()
        seen += [s["id"] for s in page["data"]]
        assert page["last_id"] == seen[-1]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == expected
    last = listing(bounded, KEY_D, after=expected[-1]).json()
    assert last["data"] == [] and last["has_more"] is False and last["last_id"] is None


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"after": "no-such-session"}, "after"),
        ({"after": "a1"}, "after"),  # KEY_A's, not KEY_D's
    ],
)
def test_bad_page_parameters_are_400_naming_them(
    bounded: HotmodelProcess, query: dict[str, Any], param: str
) -> None:
    assert_error(listing(bounded, KEY_D, **query), 400, "invalid_request", param)


def test_cli_lists_every_session_following_the_pages(
    bounded: HotmodelProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTMODEL_API_KEY", KEY_D)
    listed = run_hotmodel("sessions", "list", "--url", bounded.base_url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == PAGED
    plain = run_hotmodel("sessions", "list", "--url", bounded.base_url)
    assert plain.returncode == 0 and len(plain.stdout.splitlines()) == PAGED


def test_start_sweeps_old_sessions_and_flags_missing_prompts(bounded: HotmodelProcess) -> None:
    assert session_of(bounded, KEY_E, "old").status_code == 404  # unused for 2 days > 1
    lost = session_of(bounded, KEY_E, "lost-prompt").json()
    assert lost["system_prompt"] == "gone" and lost["system_prompt_missing"] is True
    assert session_of(bounded, KEY_E, "piratey").json()["system_prompt_missing"] is False
    log = bounded.output()
    assert "1 stored session(s) use system prompt 'gone'" in log
    assert "deleted 1 session(s) unused for 1 day(s)" in log


def _reload(hp: HotmodelProcess, replace: tuple[str, str]) -> httpx.Response:
    text = hp.config.read_text()
    assert replace[0] in text
    hp.config.write_text(text.replace(*replace))
    return httpx.post(hp.base_url + "/admin/reload", headers=bearer(ADMIN), timeout=60)


def test_reload_refuses_to_drop_a_prompt_that_sessions_use(bounded: HotmodelProcess) -> None:
    pirate = '[system_prompts.pirate]\nsystem = "Talk like a pirate."\n'
    refused = _reload(bounded, (pirate, ""))
    message = assert_error(refused, 400, "invalid_config", None)
    assert "'pirate'" in message and "1 stored session(s)" in message
    bounded.config.write_text(bounded.config.read_text() + pirate)  # back as it was
    unused = '[system_prompts.unused]\nsystem = "Nobody uses this one."\n'
    dropped = _reload(bounded, (unused, ""))
    assert dropped.status_code == 200, dropped.text
    assert "system_prompts" in dropped.json()["applied"]


def test_retention_set_by_a_reload_deletes_unused_sessions(bounded: HotmodelProcess) -> None:
    # runs last: every session older than ~2.6 s goes
    assert chat(bounded, key=KEY_E, session_id="fresh").status_code == 200
    answer = _reload(bounded, ("retention_days = 1", "retention_days = 0.00003"))
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and listing(bounded, KEY_E).json()["data"]:
        time.sleep(0.5)
    assert listing(bounded, KEY_E).json()["data"] == []
    assert listing(bounded, KEY_D).json()["data"] == []


def test_a_sweep_keeps_a_session_used_meanwhile_and_forgets_kv(
    tmp_path: Path, store: Stores
) -> None:
    """Retention deletes as DELETE does (KV snapshots told), never a session just used."""
    forgotten: list[tuple[str, str]] = []

    class Kv:
        def forget_session(self, owner: str, session_id: str) -> int:
            forgotten.append((owner, session_id))
            return 1

    async def scenario() -> None:
        async with store() as db:
            (tmp_path / "m.gguf").write_bytes(b"")
            toml = write_config(tmp_path, {"m": tmp_path / "m.gguf"}, "m")
            config = load_config(toml)
            service = SessionService(config, db, cast(RouterClient, None))
            for sid in ("stale", "used"):
                await db.append("", sid, [user("hi")], None, "")
            await _age(store, db, time.time() - 2 * DAY_S)
            retention = Retention(lambda: service.config.session, service, Kv())
            listed = db.unused_since

            async def and_one_is_used(cutoff: float) -> tuple[tuple[str, str], ...]:
                found = await listed(cutoff)
                await db.append("", "used", [user("again")], None, "")  # a turn comes in
                return found

            db.unused_since = and_one_is_used  # type: ignore[method-assign]
            assert await retention.sweep(1.0) == 1
            assert await db.get("", "stale") is None
            assert await db.get("", "used") is not None
            assert forgotten == [("", "stale")]

    asyncio.run(scenario())
    assert not sweep_due(0, 1e9) and sweep_due(1, 3600) and not sweep_due(1, 3599)
    assert sweep_due(0.00003, 1.0)  # a short retention sweeps every quarter of it (1 s least)
