"""Idle unload, preload off, and reload without restart, on the real llama-server router.

Tiny GGUF models keep these fast; what is asserted is what an operator sees:
``/admin/status``, ``/health``, the switch history and chat answers.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    HotmodelProcess,
    chat,
    run_hotmodel,
    start_hotmodel,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow  # drives the real llama-server


def router_status(hp: HotmodelProcess) -> dict[str, str]:
    models = httpx.get(hp.base_url + "/v1/models", timeout=5).json()["data"]
    return {m["id"]: m["status"] for m in models}


def test_idle_unload_then_next_request_loads_back(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    presets = {"tiny": tiny_models["tiny"], "tiny2": tiny_models["tiny2"]}
    config = write_config(
        tmp_path,
        {**presets, "embed": tiny_models["tiny"]},
        "tiny",
        router="idle_unload_seconds = 1",
    )
    ini = tmp_path / "models.ini"  # a resident companion beside the switched model
    ini.write_text(ini.read_text() + "resident = true\n")  # the last section: embed
    hp = start_hotmodel(config)
    try:
        assert chat(hp).status_code == 200
        status = wait_until(
            "the idle unload", lambda: hp.status()["parked_model"] == "tiny" or None
        )
        assert status
        assert hp.status()["active_model"] is None
        assert router_status(hp)["tiny"] == "unloaded"
        health = httpx.get(hp.base_url + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "idle"
        # what a client sees: the parked model, as "active" names it (chat loads it back)
        models = {m["id"]: m for m in httpx.get(hp.base_url + "/v1/models").json()["data"]}
        assert models["tiny"]["parked"] is True and models["tiny2"]["parked"] is False
        assert httpx.get(hp.base_url + "/v1/models/active").json()["id"] == "tiny"
        shown = run_hotmodel("status", "--config", str(config))
        assert "active model: none (tiny was unloaded for idleness" in shown.stdout, shown
        history = httpx.get(hp.base_url + "/admin/switches", timeout=5).json()["data"]
        assert history[0]["to"] is None and history[0]["outcome"] == "ok"
        assert history[0]["policy"] == "idle_unload"
        # parked stays parked: reading every status route loads nothing, not even after
        # the scheduler's linger has passed
        for path in ("/metrics", "/health", "/v1/models", "/admin/status", "/admin/switches"):
            assert httpx.get(hp.base_url + path, timeout=5).status_code == 200
        # ... nor does the resident's traffic, served meanwhile
        for _ in range(3):
            assert chat(hp, "embed").status_code == 200
        time.sleep(1.0)
        assert router_status(hp)["tiny"] == "unloaded"
        assert router_status(hp)["embed"] == "loaded"
        assert hp.status()["parked_model"] == "tiny" and hp.status()["queues"] == {}
        # the next request loads the parked model back and is answered
        reply = chat(hp)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "tiny"
        after = hp.status()
        assert after["active_model"] == "tiny" and after["parked_model"] is None
    finally:
        assert hp.stop() == 0, hp.output()


def test_no_preload_first_request_loads_the_default(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    config = write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny", router="preload = false")
    hp = start_hotmodel(config)
    try:
        status = hp.status()
        assert status["active_model"] is None and status["parked_model"] == "tiny"
        assert router_status(hp)["tiny"] == "unloaded"
        reply = chat(hp)
        assert reply.status_code == 200, reply.text
        assert hp.status()["active_model"] == "tiny"
    finally:
        assert hp.stop() == 0, hp.output()


def _reload(hp: HotmodelProcess) -> httpx.Response:
    return httpx.post(hp.base_url + "/admin/reload", timeout=60)


def test_reload_applies_live_settings_and_names_the_rest(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    presets = {"tiny": tiny_models["tiny"]}
    config = write_config(tmp_path, presets, "tiny", session="max_session_messages = 64")
    hp = start_hotmodel(config)
    try:
        pid = hp.status()["router"]["pid"]  # type: ignore[index]
        unchanged = _reload(hp)
        assert unchanged.status_code == 200 and unchanged.json()["changed"] is False

        text = config.read_text()
        edited = text.replace("max_session_messages = 64", "max_session_messages = 8")
        edited = edited.replace("ctx_size = 2048", "ctx_size = 1024")
        config.write_text(edited + '\n[system_prompts.terse]\nsystem = "Be terse."\n')
        answer = _reload(hp)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert "session.max_session_messages" in body["applied"]
        assert "system_prompts" in body["applied"]
        assert body["restart_needed"] == ["router.ctx_size"]
        assert body["reload_active"] is False
        # the new system prompt is usable at once; the running model was not touched
        reply = httpx.post(
            hp.base_url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"X-Session-Id": "s1", "X-System-Prompt": "terse"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert hp.status()["router"]["pid"] == pid  # type: ignore[index]

        # a broken file changes nothing and says where it is broken
        config.write_text(edited.replace("max_session_messages = 8", "max_session_messages = -1"))
        bad = _reload(hp)
        assert bad.status_code == 400, bad.text
        error = bad.json()["error"]
        assert error["code"] == "invalid_config"
        assert "max_session_messages" in error["message"] and "[session]" in error["message"]
        config.write_text("[server\n")
        assert _reload(hp).status_code == 400
        assert chat(hp).status_code == 200
    finally:
        assert hp.stop() == 0, hp.output()


def test_reload_presets_new_one_usable_active_one_reloaded(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    config = write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny")
    ini = tmp_path / "models.ini"
    hp = start_hotmodel(config)
    try:
        # a preset added: the running model is not stopped, the new one can be switched to
        ini.write_text(ini.read_text() + f"\n[tiny2]\nmodel = {tiny_models['tiny2']}\n")
        body = _reload(hp).json()
        assert body["presets_changed"] == ["tiny2"] and body["reload_active"] is False
        assert hp.status()["active_model"] == "tiny"
        assert chat(hp).status_code == 200
        report = httpx.post(
            hp.base_url + "/admin/switch", json={"model": "tiny2"}, timeout=120
        ).json()
        assert report["outcome"] == "ok", report
        assert "restart" in report["phases"]
        assert chat(hp, "tiny2").status_code == 200

        # the active model's own preset changed: it is loaded again with it
        ini.write_text(
            ini.read_text().replace(
                f"model = {tiny_models['tiny2']}", f"model = {tiny_models['tiny2']}\nctx-size = 512"
            )
        )
        body = _reload(hp).json()
        assert body["reload_active"] is True, body
        assert body["switch"]["outcome"] == "ok"
        assert hp.status()["active_model"] == "tiny2"
        assert chat(hp).status_code == 200

        # removing the active preset is refused, nothing changes
        ini.write_text(ini.read_text().split("[tiny2]")[0])
        refused = _reload(hp)
        assert refused.status_code == 400 and "active model" in refused.json()["error"]["message"]
        assert hp.status()["presets"] == ["tiny", "tiny2"]
    finally:
        assert hp.stop() == 0, hp.output()


def test_a_preset_file_the_router_could_not_start_on_is_refused_whole(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """Found by a new-user pass: an unknown key in the INI was accepted by a reload, the
    active model was reloaded with it, and the router could not start again (no model,
    every request 503). Now the key is named and nothing changes; so is a missing file
    for the active model, which a reload loads again at once."""
    config = write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny")
    ini = tmp_path / "models.ini"
    good = ini.read_text()
    hp = start_hotmodel(config)
    try:
        ini.write_text(good.replace("[tiny]", "[*]\nbogus-key = 3\n\n[tiny]"))
        refused = _reload(hp)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "invalid_config"
        assert "[*] bogus-key" in error["message"] and "no option 'bogus-key'" in error["message"]
        ini.write_text(good.replace(f"model = {tiny_models['tiny']}", "model = nosuch.gguf"))
        missing = _reload(hp)
        assert missing.status_code == 400 and "model file not found" in missing.text
        assert hp.status()["active_model"] == "tiny" and chat(hp).status_code == 200
        # a flag's negation and the presets' own keys are llama-server's too
        ini.write_text(good.replace("[tiny]", "[*]\nno-warmup = true\nstop-timeout = 5\n\n[tiny]"))
        assert _reload(hp).status_code == 200
        assert chat(hp).status_code == 200
    finally:
        assert hp.stop() == 0, hp.output()
    # at start, the same key is a config error naming it (exit 3), not a router failure
    ini.write_text(good.replace("[tiny]", "[tiny]\nbogus-key = 3"))
    out = run_hotmodel("serve", "--config", str(config), timeout=60)
    assert out.returncode == 3, out.stderr
    assert "[tiny] bogus-key: llama-server has no option 'bogus-key'" in out.stderr


def test_a_reload_whose_active_model_does_not_load_puts_the_previous_config_back(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """Found by a hostile pass: a new preset whose file passes the check (it starts with
    GGUF) but does not load left the new INI in force, and no model loaded. Now the
    previous configuration comes back whole, and the model is loaded again with it."""
    config = write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny")
    ini = tmp_path / "models.ini"
    good = ini.read_text()
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\xff" * 64)
    hp = start_hotmodel(config)
    try:
        ini.write_text(good.replace(f"model = {tiny_models['tiny']}", f"model = {damaged}"))
        body = _reload(hp).json()
        assert body["switch"]["outcome"] == "failed", body
        assert body["reverted"]["switch"]["outcome"] == "ok", body
        assert hp.status()["active_model"] == "tiny" and chat(hp).status_code == 200
        # the running configuration is the previous one: the good file changes nothing
        ini.write_text(good)
        assert _reload(hp).json()["changed"] is False
        ini.write_text(good.replace(f"model = {tiny_models['tiny']}", f"model = {damaged}"))
        out = run_hotmodel("reload", "--config", str(config), timeout=120)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "the previous configuration is in force again" in out.stdout
        assert chat(hp).status_code == 200
    finally:
        assert hp.stop() == 0, hp.output()


def test_sighup_reloads(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    config = write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny")
    hp = start_hotmodel(config)
    try:
        assert httpx.get(hp.base_url + "/admin/status", timeout=5).status_code == 200
        key = "admin-key-0123456789abcdef"
        config.write_text(config.read_text() + f'\n[security]\nadmin_keys = ["{key}"]\n')
        hp.proc.send_signal(signal.SIGHUP)
        wait_until(
            "the keys to apply",
            lambda: httpx.get(hp.base_url + "/admin/status", timeout=5).status_code == 401,
        )
        ok = httpx.get(
            hp.base_url + "/admin/status", headers={"Authorization": f"Bearer {key}"}, timeout=5
        )
        assert ok.status_code == 200 and ok.json()["active_model"] == "tiny"
        assert hp.proc.poll() is None  # SIGHUP did not stop it
    finally:
        assert hp.stop() == 0, hp.output()


def test_switch_progress_shows_the_routers_load_progress(
    tmp_path: Path, real_models: dict[str, Path]
) -> None:
    from tests.conftest import two_models

    with two_models(tmp_path, real_models) as hp:
        phases = []
        with httpx.stream(
            "POST",
            hp.base_url + "/admin/switch",
            json={"model": "gemma3", "stream": True},
            timeout=120,
        ) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    phases.append(json.loads(line[6:]))
        progress = [p for p in phases if p.get("status") == "progress"]
        assert progress, phases
        assert all(p["phase"] == "load" and p["detail"].endswith("%") for p in progress)
        assert phases[-1]["outcome"] == "ok"
