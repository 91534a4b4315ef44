"""Two real hotmodel nodes on one real PostgreSQL (``[store] url``): a session goes on
after a restart, and another node (its own state folder and port) sees it and
continues it. The store itself is tested in test_store_postgres.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HotmodelProcess, serving_hotmodel, write_config

pytestmark = pytest.mark.slow  # drives the real llama-server


def chat(hp: HotmodelProcess, session: str, text: str) -> httpx.Response:
    return httpx.post(
        hp.base_url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": text}], "max_tokens": 2},
        headers={"x-session-id": session},
        timeout=60,
    )


def stored(hp: HotmodelProcess, session: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{hp.base_url}/v1/sessions/{session}", timeout=10)
    assert resp.status_code == 200, resp.text
    messages: list[dict[str, Any]] = resp.json()["messages"]
    return messages


def test_a_session_continues_after_a_restart_and_on_another_node(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path, postgres_url: str
) -> None:
    tail = f'[store]\nurl = "{postgres_url}"\npool_size = 2\n'
    node_a = write_config(tmp_path / "a", {"tiny": tiny_models["tiny"]}, "tiny", tail=tail)
    node_b = write_config(tmp_path / "b", {"tiny": tiny_models["tiny"]}, "tiny", tail=tail)
    with serving_hotmodel(node_a) as a:
        assert chat(a, "shared", "first question").status_code == 200
        status = httpx.get(a.base_url + "/admin/status", timeout=10).json()
        assert status["sessions"]["store"] == postgres_url
    assert not (tmp_path / "a" / "state" / "sessions.sqlite3").exists()  # no SQLite file
    with serving_hotmodel(node_a) as a:  # restarted: the session goes on
        resp = chat(a, "shared", "second question")
        assert resp.status_code == 200 and resp.headers["x-session-id"] == "shared"
        after_restart = stored(a, "shared")
        assert [m["content"] for m in after_restart][::2] == ["first question", "second question"]
        with serving_hotmodel(node_b) as b:  # another node: same sessions
            assert stored(b, "shared") == after_restart
            assert chat(b, "shared", "third, on b").status_code == 200
            on_b = stored(b, "shared")
            assert len(on_b) == 6 and on_b[4]["content"] == "third, on b"
            assert stored(a, "shared") == on_b  # a's cached window is not stale
            assert chat(a, "shared", "fourth, on a").status_code == 200
            assert [m["content"] for m in stored(b, "shared")][::2] == [
                "first question",
                "second question",
                "third, on b",
                "fourth, on a",
            ]
