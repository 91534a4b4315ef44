"""API keys against a real hotmodel: client and admin keys, from the config, a key file
and the environment; sessions per key; unauthenticated paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hotmodel.config import load_config
from hotmodel.errors import ConfigError
from hotmodel.security import Access, KeySet, load_keys
from tests.conftest import HotmodelProcess, Serve, bearer, chat, keys, write_config

pytestmark = pytest.mark.slow  # drives the real llama-server

CLIENT_A = "client-key-aaaaaaaaaaaa"
CLIENT_B = "client-key-bbbbbbbbbbbb"  # from the key file
CLIENT_C = "client-key-cccccccccccc"  # from the environment
ADMIN = "admin-key-000000000000"


@pytest.fixture(scope="module")
def secured(serve_module: Serve, tiny_models: dict[str, Path]) -> HotmodelProcess:
    return serve_module(
        {"tiny": tiny_models["tiny"]},
        "tiny",
        tail=keys(api=[CLIENT_A], api_file="client.keys", admin=[ADMIN]),
        files={"client.keys": f"# one per line\n{CLIENT_B}\n\n"},
        env={"HOTMODEL_API_KEYS": CLIENT_C},
    )


@pytest.mark.parametrize("key", [None, "wrong-key-wrong-key-wrong", CLIENT_A[:-1], ""])
def test_v1_needs_a_valid_key(secured: HotmodelProcess, key: str | None) -> None:
    resp = chat(secured, key=key)
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "invalid_api_key"
    models = httpx.get(secured.base_url + "/v1/models", headers=bearer(key) if key else {})
    assert models.status_code == 401


@pytest.mark.parametrize("key", [CLIENT_A, CLIENT_B, CLIENT_C, ADMIN])
def test_keys_from_config_file_and_environment_work(secured: HotmodelProcess, key: str) -> None:
    assert chat(secured, key=key).status_code == 200


def test_admin_needs_an_admin_key(secured: HotmodelProcess) -> None:
    url = secured.base_url + "/admin/status"
    assert httpx.get(url).status_code == 401
    refused = httpx.get(url, headers=bearer(CLIENT_A))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
    assert httpx.get(url, headers=bearer(ADMIN)).status_code == 200
    # health stays open for probes; the keys never appear in any answer or the log
    assert httpx.get(secured.base_url + "/health").status_code == 200
    assert CLIENT_A not in httpx.get(url, headers=bearer(ADMIN)).text
    assert all(k not in secured.output() for k in (CLIENT_A, CLIENT_B, CLIENT_C, ADMIN))


def test_sessions_belong_to_the_key_that_made_them(secured: HotmodelProcess) -> None:
    assert chat(secured, key=CLIENT_A, session_id="shared-name").status_code == 200
    assert chat(secured, key=CLIENT_B, session_id="shared-name").status_code == 200
    assert chat(secured, key=CLIENT_B, session_id="shared-name").status_code == 200
    url = secured.base_url + "/v1/sessions"
    mine = httpx.get(url + "/shared-name", headers=bearer(CLIENT_A)).json()
    theirs = httpx.get(url + "/shared-name", headers=bearer(CLIENT_B)).json()
    assert len(mine["messages"]) == 2 and len(theirs["messages"]) == 4
    assert httpx.get(url + "/shared-name", headers=bearer(CLIENT_C)).status_code == 404
    assert httpx.delete(url + "/shared-name", headers=bearer(CLIENT_C)).status_code == 404
    listed = httpx.get(url, headers=bearer(CLIENT_C)).json()["data"]
    assert listed == []
    assert httpx.get(url + "/shared-name", headers=bearer(CLIENT_A)).status_code == 200


def test_the_cli_uses_the_configured_admin_key(secured: HotmodelProcess) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hotmodel", "status", "--config", str(secured.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "active model: tiny" in out.stdout


def test_key_sources_and_rules(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    keys = load_keys({"api_keys": [CLIENT_A], "admin_keys": [ADMIN]}, config, {})
    assert keys.check(CLIENT_A) is Access.CLIENT and keys.check(ADMIN) is Access.ADMIN
    assert keys.check("nope") is None and keys.check(None) is None
    assert CLIENT_A not in repr(keys)  # a config printed in a log shows no key
    env = load_keys({}, config, {"HOTMODEL_API_KEYS": f" {CLIENT_B} , {CLIENT_C}"})
    assert env == KeySet((CLIENT_B, CLIENT_C), ())
    with pytest.raises(ConfigError, match=r"\[security\]: every API key must be at least 16"):
        load_keys({"api_keys": ["short"]}, config, {})
    with pytest.raises(ConfigError, match=r"\[security\] api_keys_file: cannot read"):
        load_keys({"api_keys_file": "missing.keys"}, config, {})


def test_unknown_security_key_is_a_config_error(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    config = write_config(
        tmp_path, {"tiny": tiny_models["tiny"]}, "tiny", tail='[security]\nkeys = ["x"]\n'
    )
    with pytest.raises(ConfigError, match=r"\[security\] keys: unknown key"):
        load_config(config)
