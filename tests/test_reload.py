"""Reload decisions and idle-unload timing, as pure functions (no router)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hotmodel.api.chat import ModelParkedError, resolve_model
from hotmodel.config import load_config
from hotmodel.control.idle import idle_wait
from hotmodel.control.reload import plan_reload
from hotmodel.errors import ConfigError, ModelNotActiveError
from tests.conftest import write_config


def _configs(tmp_path: Path, **edits: str) -> tuple[Path, Path]:
    config = write_config(tmp_path, {"a": tmp_path / "a.gguf", "b": tmp_path / "b.gguf"}, "a")
    return config, tmp_path / "models.ini"


def test_unchanged_files_change_nothing(tmp_path: Path) -> None:
    config, _ = _configs(tmp_path)
    old = load_config(config)
    plan = plan_reload(old, load_config(config), "a")
    assert not plan.changed and plan.config == old


def test_live_keys_apply_and_process_keys_need_a_restart(tmp_path: Path) -> None:
    config, _ = _configs(tmp_path)
    old = load_config(config)
    text = config.read_text().replace("ctx_size = 2048", "ctx_size = 1024")
    text = text.replace("[session]", "[session]\nmax_session_messages = 8")
    text = text.replace("[switch]", "[switch]\nauto = true\nkv_snapshot_max_bytes = 1000")
    config.write_text(text.replace("[router]", "[router]\nidle_unload_seconds = 30"))
    plan = plan_reload(old, load_config(config), "a")
    assert set(plan.applied) == {
        "session.max_session_messages",
        "switch.auto",
        "switch.kv_snapshot_max_bytes",  # the snapshot folder is trimmed to it at once
        "router.idle_unload_seconds",
    }
    assert set(plan.restart_needed) == {"router.ctx_size"}
    # the effective config: live keys new, restart keys still the running ones
    assert plan.config.session.max_session_messages == 8 and plan.config.switch.auto
    assert plan.config.router.ctx_size == 2048
    assert plan.config.switch.kv_snapshot_max_bytes == 1000
    assert not plan.presets_changed and not plan.reload_active


def test_presets_changed_and_the_active_ones_own(tmp_path: Path) -> None:
    config, ini = _configs(tmp_path)
    old = load_config(config)
    ini.write_text(ini.read_text() + f"\n[c]\nmodel = {tmp_path / 'c.gguf'}\n")
    added = plan_reload(old, load_config(config), "a")
    assert added.presets_changed == ("c",) and not added.reload_active
    ini.write_text(ini.read_text().replace("[a]", "[a]\nctx-size = 512"))
    edited = plan_reload(old, load_config(config), "a")
    assert edited.reload_active and "a" in edited.presets_changed
    assert not plan_reload(old, load_config(config), "b").reload_active


def test_removing_the_active_preset_is_refused(tmp_path: Path) -> None:
    config, ini = _configs(tmp_path)
    old = load_config(config)
    ini.write_text(ini.read_text().split("[b]")[0])
    plan_reload(old, load_config(config), "a")  # b is not active: fine
    with pytest.raises(ConfigError, match=r"\[b\].*active model"):
        plan_reload(old, load_config(config), "b")


def test_keys_and_prompts_are_live(tmp_path: Path) -> None:
    config, _ = _configs(tmp_path)
    old = load_config(config)
    config.write_text(
        config.read_text()
        + '\n[system_prompts.x]\nsystem = "X"\n\n[security]\nadmin_keys = ["k'
        + "0" * 20
        + '"]\n'
    )
    plan = plan_reload(old, load_config(config), "a")
    assert set(plan.applied) == {"system_prompts", "security.keys"}
    assert plan.config.keys.enabled and "x" in plan.config.system_prompts
    assert "k000" not in repr(plan.to_json())  # a key is never echoed


def test_idle_wait() -> None:
    assert idle_wait(0, 100, loaded=True, busy=False) > 0  # off
    assert idle_wait(10, 100, loaded=False, busy=False) > 0  # nothing loaded
    assert idle_wait(10, 4, loaded=True, busy=False) == 6
    assert idle_wait(10, 10, loaded=True, busy=False) == 0
    assert 0 < idle_wait(10, 100, loaded=True, busy=True) <= 10  # a command runs: later


def test_a_parked_model_is_loaded_back_by_the_next_request() -> None:
    presets = ["a", "b"]
    for requested in (None, "", "active", "a"):
        with pytest.raises(ModelParkedError) as parked:
            resolve_model(requested, None, presets, parked="a")
        assert parked.value.model == "a"
    with pytest.raises(ModelNotActiveError):  # another preset: as if "a" were active
        resolve_model("b", None, presets, parked="a")
    assert resolve_model("a", "a", presets, parked=None) == "a"


def test_reload_plan_json_shape(tmp_path: Path) -> None:
    config, _ = _configs(tmp_path)
    old = load_config(config)
    body = plan_reload(old, dataclasses.replace(old), "a").to_json()
    assert set(body) == {
        "changed",
        "applied",
        "restart_needed",
        "presets_changed",
        "reload_active",
    }


def test_serve_flags_survive_a_reload(tmp_path: Path) -> None:
    config, _ = _configs(tmp_path)
    old = load_config(config).with_server_overrides(port=1234, log_level="warning")
    assert old.server.port == 1234 and old.server_overrides == {
        "port": 1234,
        "log_level": "warning",
    }
    fresh = load_config(config)
    assert plan_reload(old, fresh, "a").restart_needed == ("server.port",)  # without them
    again = fresh.with_server_overrides(**old.server_overrides)  # what reload_config does
    plan = plan_reload(old, again, "a")
    assert not plan.changed and plan.config.server.log_level == "warning"
