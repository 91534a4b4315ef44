"""What a newcomer meets first (issue 22, item 6), against the real llama-server with the
demo's two models: ``hotmodel models`` during a switch, ``hotmodel reload`` of a preset
whose GGUF is missing, ``hotmodel switch --json`` refused.

One hotmodel serves the module, set up like the demo (CPU only, KV snapshots on, one
slot), so a switch saves and unloads the leaving model while the next one loads.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotmodel.cli.client import models_table
from hotmodel.router.supervisor import free_port
from tests.conftest import HotmodelProcess, run_hotmodel, serving_hotmodel, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_like(
    tmp_path_factory: pytest.TempPathFactory, real_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    folder = tmp_path_factory.mktemp("walkthrough")
    config = write_config(
        folder,
        {"smollm2": real_models["smollm2"], "gemma3": real_models["gemma3"]},
        "smollm2",
        router="parallel = 1",
        extra="kv_snapshots = true",
    )
    with serving_hotmodel(config) as hp:
        yield hp


def _client(hp: HotmodelProcess, *args: str) -> Any:
    return run_hotmodel(*args, "--config", str(hp.config), timeout=300)


def _active(hp: HotmodelProcess) -> str:
    active = hp.status()["active_model"]
    assert isinstance(active, str)
    return active


def test_models_marks_only_the_model_that_is_really_active_during_a_switch(
    demo_like: HotmodelProcess,
) -> None:
    """The issue saw the unloaded model marked ``*`` while the next one loaded: from the
    unload to the activation no model serves (requests wait for the switch)."""
    before = _active(demo_like)
    target = "gemma3" if before == "smollm2" else "smollm2"
    seen: list[list[dict[str, Any]]] = []
    done = threading.Event()

    def switch() -> None:
        try:
            httpx.post(
                demo_like.base_url + "/admin/switch", json={"model": target}, timeout=300
            ).raise_for_status()
        finally:
            done.set()

    thread = threading.Thread(target=switch)
    thread.start()
    while not done.is_set():
        seen.append(httpx.get(demo_like.base_url + "/v1/models", timeout=30).json()["data"])
        time.sleep(0.02)
    thread.join()
    midway = [
        models
        for models in seen
        if all(m["status"] != "loaded" for m in models if m["id"] in (before, target))
    ]  # the one model unloaded (or on its way out), the other not loaded yet
    assert midway, "no listing caught the switch between its unload and its activation"
    for models in seen:
        marked = [m for m in models if m["active"]]
        assert all(m["status"] == "loaded" for m in marked), models
        rows = models_table(models)
        assert all(row.split()[1] == "loaded" for row in rows[1:] if " * " in f"{row} "), rows
    for models in midway:
        assert not any(m["active"] for m in models), models
    after = httpx.get(demo_like.base_url + "/v1/models", timeout=30).json()
    assert after["active"] == target
    assert [m["id"] for m in after["data"] if m["active"]] == [target]


def test_reload_refuses_a_preset_whose_gguf_is_missing(demo_like: HotmodelProcess) -> None:
    """``hotmodel serve`` refuses a default model whose file is missing (exit 3); a reload
    that adds or edits a preset with a missing file (or makes it the default) is refused
    the same way, naming the file, the section and the key, and nothing changes."""
    ini = demo_like.config.parent / "models.ini"
    toml = demo_like.config
    good_ini, good_toml = ini.read_text(encoding="utf-8"), toml.read_text(encoding="utf-8")
    models_before = httpx.get(demo_like.base_url + "/v1/models", timeout=30).json()
    try:
        ini.write_text(good_ini + "\n[mine]\nmodel = models/mine.gguf\n", encoding="utf-8")
        added = _client(demo_like, "reload")
        assert added.returncode == 1, added.stdout + added.stderr
        assert str(ini) in added.stderr and "[mine]" in added.stderr, added.stderr
        assert "model" in added.stderr and "mine.gguf" in added.stderr, added.stderr
        toml.write_text(
            good_toml.replace('default_model = "smollm2"', 'default_model = "mine"'),
            encoding="utf-8",
        )
        as_default = _client(demo_like, "reload", "--json")
        assert as_default.returncode == 1
        error = json.loads(as_default.stdout)["error"]
        assert error["code"] == "invalid_config" and "[mine]" in error["message"], error
        # and what serve says of the same files (a copy of the TOML beside: its own port
        # and state folder, the same INI)
        other = toml.parent / "other"
        other.mkdir(exist_ok=True)
        (other / "hotmodel.toml").write_text(
            toml.read_text(encoding="utf-8").replace('"models.ini"', '"../models.ini"'),
            encoding="utf-8",
        )
        port = str(free_port("127.0.0.1"))
        serve = run_hotmodel("serve", "-c", str(other / "hotmodel.toml"), "--port", port)
        assert serve.returncode == 3, serve.stdout + serve.stderr
        assert "[mine]" in serve.stderr and "model file not found" in serve.stderr
    finally:
        ini.write_text(good_ini, encoding="utf-8")
        toml.write_text(good_toml, encoding="utf-8")
    after = httpx.get(demo_like.base_url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in after["data"]] == [m["id"] for m in models_before["data"]]
    unchanged = _client(demo_like, "reload")
    assert unchanged.returncode == 0, unchanged.stderr
    assert unchanged.stdout == "config unchanged: nothing to apply\n"


def test_switch_json_to_no_preset_prints_the_error_object(demo_like: HotmodelProcess) -> None:
    result = _client(demo_like, "switch", "nosuch", "--json")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model", error
    assert "nosuch" in error["message"]


def test_the_dashboards_switch_panel_shows_the_latest_switch(demo_like: HotmodelProcess) -> None:
    """The issue saw "none yet" above a history of 8 switches: a page opened after the
    switches shows the newest report in the Switch panel, its phases and outcome."""
    from playwright.sync_api import expect

    from tests.browser import browser_page

    httpx.post(
        demo_like.base_url + "/admin/switch", json={"model": "gemma3"}, timeout=300
    ).raise_for_status()
    history = httpx.get(demo_like.base_url + "/admin/switches", timeout=30).json()["data"]
    latest = history[0]
    assert len(history) >= 2 and latest["to"] == "gemma3"
    with browser_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(demo_like.base_url + "/ui")
        expect(page.locator("#history tbody tr")).to_have_count(len(history), timeout=60_000)
        title = f"#{latest['id']} {latest['from'] or 'none'} → {latest['to']}"
        expect(page.locator("#progress-title")).to_have_text(title)
        phases = page.locator("#phases li")
        expect(phases).to_have_count(len(latest["phases"]))
        expect(page.locator('#phases li[data-phase="load"].status-done')).to_be_visible()
        expect(page.locator("#switch-message")).to_contain_text("active: gemma3")
        order = phases.evaluate_all("(items) => items.map((li) => li.dataset.phase)")
        starts = latest["phase_starts"]
        assert order == sorted(latest["phases"], key=lambda p: starts[p]), order
        assert not errors, errors


def test_the_chat_template_keys_the_readme_names_are_llama_servers(llama_server: Path) -> None:
    from hotmodel.router.options import known_options

    known = known_options(llama_server)
    assert known is not None
    assert {"chat-template-file", "chat-template"} <= known
