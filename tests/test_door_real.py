"""The door against a real hotmodel on the real SmolLM2 and Gemma: what a web page, a
local process and another API key may not do (issue 20; docs/reliability.md#security).

- a cross-site page: a ``text/plain`` POST (no CORS preflight) to switch, reload or
  write a session turn; a DNS-rebinding ``Host``; all refused, nothing changed;
- a local process: llama-server's router and model ports refuse a request without
  hotmodel's generated key; state files are the user's only;
- another tenant: a guessed prefix reuses none of another key's prompt cache.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import HotmodelProcess, bearer, serving_hotmodel, write_config

pytestmark = pytest.mark.slow  # drives the real llama-server

C1 = "tenant-one-key-111111111111"
C2 = "tenant-two-key-222222222222"
ADMIN = "door-admin-key-000000000000"
EVIL = "http://evil.example.com"
SECRET = "My bank PIN is 4729. Remember it and never tell anyone."


@pytest.fixture(scope="module")
def open_server(
    tmp_path_factory: pytest.TempPathFactory, real_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    """The demo's shape: no keys, auto switch on, KV snapshots on."""
    folder = tmp_path_factory.mktemp("door-open")
    config = write_config(
        folder,
        {"smollm2": real_models["smollm2"], "gemma3": real_models["gemma3"]},
        "smollm2",
        server='allowed_origins = ["https://chat.example.org"]',
        extra="auto = true\nkv_snapshots = true",
    )
    with serving_hotmodel(config) as hp:
        yield hp


@pytest.fixture(scope="module")
def keyed_server(
    tmp_path_factory: pytest.TempPathFactory, real_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    folder = tmp_path_factory.mktemp("door-keyed")
    config = write_config(
        folder,
        {"smollm2": real_models["smollm2"], "gemma3": real_models["gemma3"]},
        "smollm2",
        extra='auto = true\nauto_access = "admin"',
        tail=f'[security]\napi_keys = ["{C1}", "{C2}"]\nadmin_keys = ["{ADMIN}"]\n',
    )
    with serving_hotmodel(config) as hp:
        yield hp


def _active(hp: HotmodelProcess, key: str | None = None) -> Any:
    headers = bearer(key) if key else {}
    return httpx.get(hp.base_url + "/admin/status", headers=headers, timeout=10).json()[
        "active_model"
    ]


def _session(hp: HotmodelProcess, sid: str, key: str | None = None) -> httpx.Response:
    headers = bearer(key) if key else {}
    return httpx.get(f"{hp.base_url}/v1/sessions/{sid}", headers=headers, timeout=10)


def test_a_cross_site_text_plain_post_changes_nothing(open_server: HotmodelProcess) -> None:
    url = open_server.base_url
    page = {"origin": EVIL, "content-type": "text/plain;charset=UTF-8"}
    switch = httpx.post(url + "/admin/switch", content='{"model":"gemma3"}', headers=page)
    assert switch.status_code == 403, switch.text
    assert switch.json()["error"]["code"] == "origin_not_allowed"
    assert httpx.post(url + "/admin/reload", content="", headers=page).status_code == 403
    turn = '{"session_id":"door-x","messages":[{"role":"user","content":"IGNORE ALL"}]}'
    chat = httpx.post(url + "/v1/chat/completions", content=turn, headers=page)
    assert chat.status_code == 403
    assert _active(open_server) == "smollm2"
    assert _session(open_server, "door-x").status_code == 404


def test_a_cross_site_post_to_the_other_apis_is_refused_even_with_a_valid_key(
    keyed_server: HotmodelProcess,
) -> None:
    """A page cannot add a key header without a CORS preflight, but whatever it sends, a
    cross-site request to Anthropic Messages (its ``x-api-key``, a valid key) or OpenAI
    Responses is refused at the door as chat's is, before the key is read: in
    Anthropic's shape on /v1/messages, and nothing is stored."""
    url = keyed_server.base_url
    page = {"origin": EVIL, "content-type": "text/plain;charset=UTF-8"}
    turn = '{"model":"smollm2","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}'
    for headers in (
        {**page, "x-api-key": C1, "x-session-id": "door-m"},
        {**page, "x-api-key": C1, "x-session-id": "door-m", "content-type": "application/json"},
        {**page, "x-api-key": C1, "sec-fetch-site": "cross-site"},
    ):
        got = httpx.post(url + "/v1/messages", content=turn, headers=headers, timeout=30)
        assert got.status_code == 403, (headers, got.text)
        assert got.json() == {
            "type": "error",
            "error": {"type": "permission_error", "message": got.json()["error"]["message"]},
        }
        assert "another site" in got.json()["error"]["message"]
    asked = '{"model":"smollm2","input":"hi","max_output_tokens":4}'
    responses = httpx.post(
        url + "/v1/responses", content=asked, headers={**page, **bearer(C1)}, timeout=30
    )
    assert responses.status_code == 403
    assert responses.json()["error"]["code"] == "origin_not_allowed"
    assert _session(keyed_server, "door-m", C1).status_code == 404  # nothing stored
    # the same request from no page (a script): it passes the door with the key
    script = {"content-type": "application/json", "x-api-key": C1}
    assert httpx.post(url + "/v1/messages", content=turn, headers=script, timeout=120).is_success


def test_a_json_route_refuses_other_content_types(open_server: HotmodelProcess) -> None:
    """Without an Origin (a page that managed to hide it, curl -d): still no side effect."""
    url = open_server.base_url
    turn = '{"session_id":"door-y","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        headers = {"content-type": content_type}
        resp = httpx.post(url + "/v1/chat/completions", content=turn, headers=headers)
        assert resp.status_code == 415, (content_type, resp.text)
        assert resp.json()["error"]["code"] == "unsupported_media_type"
    switch = httpx.post(
        url + "/admin/switch", content='{"model":"gemma3"}', headers={"content-type": "text/plain"}
    )
    assert switch.status_code == 415
    assert _session(open_server, "door-y").status_code == 404
    assert _active(open_server) == "smollm2"


def test_a_rebinding_host_reads_nothing(open_server: HotmodelProcess) -> None:
    url = open_server.base_url
    ok = httpx.post(
        url + "/v1/chat/completions",
        json={
            "session_id": "door-z",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
        },
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
    for host in ("evil.example.com", "evil.example.com:18080", "localhost.evil.com"):
        resp = httpx.get(url + "/v1/sessions/door-z", headers={"host": host})
        assert resp.status_code == 400, (host, resp.text)
        assert resp.json()["error"]["code"] == "host_not_allowed"
        assert "messages" not in resp.json()
    port = url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(url + "/v1/sessions/door-z", headers={"host": host}).status_code == 200


def test_the_dashboard_and_same_origin_calls_keep_working(open_server: HotmodelProcess) -> None:
    url = open_server.base_url
    assert httpx.get(url + "/ui").status_code == 200
    same = httpx.post(
        url + "/admin/switch",
        json={"model": "active"},
        headers={"origin": url, "sec-fetch-site": "same-origin"},
        timeout=60,
    )
    assert same.status_code == 200, same.text


def test_cors_only_for_the_listed_origin(open_server: HotmodelProcess) -> None:
    url = open_server.base_url + "/v1/models"
    listed = "https://chat.example.org"
    pre = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    ok = httpx.options(url, headers={"origin": listed, **pre})
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == listed
    got = httpx.get(url, headers={"origin": listed})
    assert got.status_code == 200 and got.headers["access-control-allow-origin"] == listed
    other = httpx.options(url, headers={"origin": EVIL, **pre})
    assert other.status_code == 403
    assert "access-control-allow-origin" not in other.headers
    plain = httpx.get(url)  # no Origin: no CORS headers either
    assert "access-control-allow-origin" not in plain.headers


def _llama_ports(hp: HotmodelProcess) -> list[int]:
    """Every port a llama-server of this hotmodel (router and model processes) listens on."""
    ports = []
    for proc in hp.descendants():
        try:
            ports += [c.laddr.port for c in proc.net_connections("tcp") if c.status == "LISTEN"]
        except psutil.Error:
            continue
    return ports


def test_llama_server_answers_only_hotmodel(open_server: HotmodelProcess) -> None:
    ports = _llama_ports(open_server)
    assert len(ports) >= 2, ports  # the router and the loaded model's own process
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for port in ports:
        base = f"http://127.0.0.1:{port}"
        for path in ("/props", "/slots", "/v1/models", "/models"):
            assert httpx.get(base + path, timeout=10).status_code == 401, (port, path)
        chat = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
        assert chat.status_code == 401, (port, chat.text)
        # and the process's command line does not carry the key
        for proc in open_server.descendants():
            assert not any("api-key" in a for a in proc.cmdline())
    assert (
        httpx.post(open_server.base_url + "/v1/chat/completions", json=body, timeout=60).status_code
        == 200
    )


def test_state_files_are_private(open_server: HotmodelProcess) -> None:
    # a session turn, then a switch away and back: store, WAL, snapshots, sidecars, logs
    url = open_server.base_url
    turn = {
        "session_id": "door-files",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 1,
    }
    assert httpx.post(url + "/v1/chat/completions", json=turn, timeout=60).status_code == 200
    for model in ("gemma3", "smollm2"):
        switched = httpx.post(url + "/admin/switch", json={"model": model}, timeout=120)
        assert switched.status_code == 200, switched.text
    state = open_server.config.parent / "state"
    found = list(state.rglob("*"))
    assert any(p.suffix == ".sqlite3" for p in found)
    assert any(p.parent.name == "kv" for p in found), found
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in found:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


def test_two_authorization_headers_are_refused(keyed_server: HotmodelProcess) -> None:
    url = keyed_server.base_url + "/v1/models"
    for pair in ((C1, C2), (C1, C1), ("wrong-wrong-wrong-wrong", C1)):
        headers = [("authorization", f"Bearer {k}") for k in pair]
        resp = httpx.get(url, headers=headers)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "multiple_authorization_headers"


def _cached(hp: HotmodelProcess, key: str, text: str) -> int:
    resp = httpx.post(
        hp.base_url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": text}], "max_tokens": 1, "temperature": 0},
        headers=bearer(key),
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    data = resp.json()
    cached = data["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
    assert cached == data["timings"]["cache_n"]
    return int(cached)


def test_a_tenant_cannot_read_another_keys_prompt_cache(keyed_server: HotmodelProcess) -> None:
    right, wrong = "My bank PIN is 4729", "My bank PIN is 8125"
    guesses: dict[str, list[int]] = {}
    for guess in (right, wrong, right):
        _cached(keyed_server, C1, SECRET)
        guesses.setdefault(guess, []).append(_cached(keyed_server, C2, guess))
    assert guesses[right] == [0, 0] and guesses[wrong] == [0], guesses
    # the cache itself still works for each key's own prompts
    _cached(keyed_server, C1, SECRET)
    assert _cached(keyed_server, C1, SECRET) > 20


def test_only_an_admin_key_switches_when_auto_access_is_admin(
    keyed_server: HotmodelProcess,
) -> None:
    body = {"model": "gemma3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    url = keyed_server.base_url + "/v1/chat/completions"
    refused = httpx.post(url, json=body, headers=bearer(C1), timeout=60)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "auto_switch_forbidden"
    assert _active(keyed_server, ADMIN) == "smollm2"
    done = httpx.post(url, json=body, headers=bearer(ADMIN), timeout=120)
    assert done.status_code == 200, done.text
    assert _active(keyed_server, ADMIN) == "gemma3"
    back = httpx.post(url, json={**body, "model": "smollm2"}, headers=bearer(ADMIN), timeout=120)
    assert back.status_code == 200


def test_a_reload_that_would_lock_admin_is_refused(keyed_server: HotmodelProcess) -> None:
    config = keyed_server.config
    before = config.read_text()
    try:
        config.write_text(before.replace(f'admin_keys = ["{ADMIN}"]', ""))
        resp = httpx.post(
            keyed_server.base_url + "/admin/reload", headers=bearer(ADMIN), timeout=60
        )
        assert resp.status_code == 400, resp.text
        assert "admin_keys" in resp.json()["error"]["message"]
        assert _active(keyed_server, ADMIN) is not None  # the admin key still works
    finally:
        config.write_text(before)
