"""The door's pure decisions: the browser checks (``api/browser.refusal``), whose prompt a
slot holds (``sessions/tenants.SlotTenants``) and the state files' modes (``private``)."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hotmodel.api.browser import host_name, read_headers, refusal
from hotmodel.config import ServerConfig, parse_config
from hotmodel.errors import ConfigError, SlotBusyError
from hotmodel.private import make_private
from hotmodel.security import load_keys
from hotmodel.sessions.tenants import SlotTenants

T = TypeVar("T")
SERVER = ServerConfig(host="127.0.0.1", port=18080)
JSON = {"content-type": "application/json", "content-length": "2"}


def code(method: str, headers: dict[str, str], server: ServerConfig = SERVER) -> str | None:
    found = refusal(method, headers, server)
    return None if found is None else found.code


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("localhost:18080", "localhost"),
        ("[::1]:18080", "::1"),
        ("::1", "::1"),
        ("Example.COM", "example.com"),
        ("10.0.0.2:80", "10.0.0.2"),
    ],
)
def test_host_name(host: str, name: str) -> None:
    assert host_name(host) == name


@pytest.mark.parametrize(
    "host", ["localhost:18080", "127.0.0.1:18080", "[::1]:18080", "192.168.1.9:18080", ""]
)
def test_own_and_ip_hosts_pass(host: str) -> None:
    assert code("GET", {"host": host}) is None


@pytest.mark.parametrize(
    "host", ["evil.example.com", "localhost.evil.com:18080", "127.0.0.1.nip.io"]
)
def test_other_names_are_rebinding(host: str) -> None:
    assert code("GET", {"host": host}) == "host_not_allowed"


def test_allowed_hosts_and_the_configured_host() -> None:
    server = ServerConfig(host="box.lan", allowed_hosts=("llm.example.org",))
    assert code("GET", {"host": "box.lan:18080"}, server) is None
    assert code("GET", {"host": "LLM.example.org"}, server) is None
    assert code("GET", {"host": "other.example.org"}, server) == "host_not_allowed"
    anything = ServerConfig(allowed_hosts=("*",))
    assert code("GET", {"host": "whatever.example"}, anything) is None


def test_origins() -> None:
    own = {"host": "127.0.0.1:18080", **JSON}
    assert code("POST", {**own, "origin": "http://127.0.0.1:18080"}) is None
    assert code("POST", {**own, "origin": "https://127.0.0.1:18080"}) is None  # a TLS proxy
    for origin in ("http://evil.example", "http://127.0.0.1:3000", "null", "file://"):
        assert code("POST", {**own, "origin": origin}) == "origin_not_allowed", origin
        assert code("GET", {"host": own["host"], "origin": origin}) == "origin_not_allowed"
    listed = ServerConfig(allowed_origins=("https://chat.example.org",))
    assert code("POST", {**own, "origin": "https://chat.example.org"}, listed) is None
    assert code("POST", {**own, "origin": "https://chat.example.org:8443"}, listed) is not None


def test_a_cross_site_write_without_origin() -> None:
    assert code("POST", {**JSON, "sec-fetch-site": "cross-site"}) == "origin_not_allowed"
    assert code("DELETE", {"sec-fetch-site": "same-site"}) == "origin_not_allowed"
    assert code("GET", {"sec-fetch-site": "cross-site"}) is None  # a link to the dashboard
    assert code("POST", {**JSON, "sec-fetch-site": "same-origin"}) is None


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", None),
        ("application/json; charset=utf-8", None),
        ("Application/JSON", None),
        ("application/merge-patch+json", None),
        ("text/plain", "unsupported_media_type"),
        ("text/plain;charset=UTF-8", "unsupported_media_type"),
        ("application/x-www-form-urlencoded", "unsupported_media_type"),
        ("multipart/form-data; boundary=x", "unsupported_media_type"),
        ("", None),  # none named: a script (a page's POST always names one, and an Origin)
    ],
)
def test_bodies_must_be_json(content_type: str, expected: str | None) -> None:
    headers = {"content-length": "10", "content-type": content_type}
    assert code("POST", headers) == expected
    chunked = {"transfer-encoding": "chunked", "content-type": content_type}
    assert code("POST", chunked) == expected


def test_no_body_needs_no_content_type_but_a_named_one_must_be_json() -> None:
    assert code("POST", {"content-length": "0"}) is None
    assert code("POST", {}) is None
    assert code("POST", {"content-type": "text/plain"}) == "unsupported_media_type"
    assert code("DELETE", {"content-length": "5", "content-type": "text/plain"}) is None


@pytest.mark.parametrize("name", [b"host", b"origin", b"content-type", b"sec-fetch-site"])
def test_a_header_the_door_reads_twice_is_refused(name: bytes) -> None:
    raw = [(name, b"localhost"), (b"x-other", b"1"), (name.upper(), b"127.0.0.1")]
    headers, twice = read_headers(raw)
    assert twice == name.decode()
    found = refusal("GET", headers, SERVER, twice)
    assert found is not None and (found.status, found.code) == (400, "duplicate_header")
    assert read_headers([(b"accept", b"a"), (b"accept", b"b")])[1] is None


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_a_key_reuses_only_its_own_prompt() -> None:
    async def scenario() -> list[bool]:
        tenants = SlotTenants(parallel=1)
        seen = []
        for owner in ("a", "a", "b", "a", "a"):
            async with tenants.use("m", owner, 1) as reuse:
                seen.append(reuse)
        tenants.wrote("m", "b")  # a restore of b's session
        async with tenants.use("m", "b", 1) as reuse:
            seen.append(reuse)
        async with tenants.use("other-model", "b", 1) as reuse:
            seen.append(reuse)  # nothing known about that model's slot yet
        return seen

    assert run(scenario()) == [False, True, False, False, True, True, False]


def test_two_keys_never_share_a_slot_at_once() -> None:
    async def scenario() -> list[str]:
        tenants = SlotTenants(parallel=1)
        order: list[str] = []

        async def request(owner: str, name: str, hold: float) -> None:
            async with tenants.use("m", owner, 5):
                order.append(f"+{name}")
                await asyncio.sleep(hold)
                order.append(f"-{name}")

        first = asyncio.create_task(request("a", "a1", 0.05))
        await asyncio.sleep(0)
        second = asyncio.create_task(request("a", "a2", 0.05))  # the same key: side by side
        await asyncio.sleep(0)
        other = asyncio.create_task(request("b", "b1", 0.01))  # waits for both
        await asyncio.sleep(0)
        late = asyncio.create_task(request("a", "a3", 0.01))  # behind b: no starving it
        await asyncio.gather(first, second, other, late)
        return order

    order = run(scenario())
    assert order.index("+b1") > max(order.index("-a1"), order.index("-a2"))
    assert order.index("+a3") > order.index("-b1")


def test_a_wait_is_bounded_and_releases_nothing_it_did_not_get() -> None:
    async def scenario() -> bool:
        tenants = SlotTenants(parallel=1)
        async with tenants.use("m", "a", 1):
            with pytest.raises(SlotBusyError):
                async with tenants.use("m", "b", 0.05):
                    pass
            waiter = asyncio.create_task(_enter(tenants, "b"))
            await asyncio.sleep(0.01)
            waiter.cancel()  # a client that left while it waited
            with pytest.raises(asyncio.CancelledError):
                await waiter
        async with tenants.use("m", "b", 0.05) as reuse:  # free again: no leftover holder
            return reuse

    assert run(scenario()) is False


async def _enter(tenants: SlotTenants, owner: str) -> None:
    async with tenants.use("m", owner, 5):
        pass


def test_keys_are_pinned_to_slots_only_with_several() -> None:
    assert SlotTenants(parallel=1).pinned("a") is None
    four = SlotTenants(parallel=4)
    slots = {four.pinned(f"key-{i}") for i in range(40)}
    assert slots <= {0, 1, 2, 3} and len(slots) > 1
    assert four.pinned("key-1") == four.pinned("key-1")


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes; Windows uses the folder's ACL")
def test_state_left_wide_open_is_narrowed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "kv").mkdir(parents=True)
    store = state / "sessions.sqlite3"
    store.write_text("x")
    store.chmod(0o644)
    (state / "kv").chmod(0o755)
    script = state / "tools" / "run.sh"  # not ours: its owner keeps what it had
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    outside = tmp_path / "router.log"
    outside.write_text("log")
    outside.chmod(0o666)
    make_private(state, [outside, tmp_path / "missing.log"])
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "kv").stat().st_mode) == 0o700
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    assert stat.S_IMODE(script.stat().st_mode) == 0o700


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_a_key_file_others_may_read_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "admin.keys"
    keys.write_text("an-admin-key-0000000000\n")
    keys.chmod(0o644)
    load_keys({"admin_keys_file": "admin.keys"}, tmp_path / "hotmodel.toml", environ={})
    assert "chmod 600" in caplog.text and str(keys) in caplog.text
    caplog.clear()
    keys.chmod(0o600)
    load_keys({"admin_keys_file": "admin.keys"}, tmp_path / "hotmodel.toml", environ={})
    assert "chmod 600" not in caplog.text


@pytest.mark.parametrize("args", [["-np", "2"], ["--parallel", "2"], ["--parallel=2"]])
def test_the_slot_count_is_set_in_one_place(tmp_path: Path, args: list[str]) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    (tmp_path / "m.ini").write_text(f"[m]\nmodel = {model}\n")
    raw = {"router": {"models_preset": "m.ini", "default_model": "m", "extra_args": args}}
    with pytest.raises(ConfigError, match="extra_args"):
        parse_config(raw, tmp_path / "hotmodel.toml")
