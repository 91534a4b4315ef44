"""Config parsing and validation (pure; no processes)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from hotmodel.config import load_config
from hotmodel.errors import ConfigError
from hotmodel.presets import load_presets
from hotmodel.security import fingerprint
from hotmodel.sessions.store import open_store

ROOT = Path(__file__).resolve().parent.parent

INI = """version = 1

[*]
c = 4096

[small]
model = models/small.gguf
n-gpu-layers = 99

[big]
model = /abs/big.gguf
"""


def _write(folder: Path, toml: str, ini: str = INI) -> Path:
    (folder / "models.ini").write_text(ini)
    path = folder / "hotmodel.toml"
    path.write_text(toml)
    return path


MINIMAL = '[router]\nmodels_preset = "models.ini"\ndefault_model = "small"\n'


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 18080)
    assert cfg.server.state_dir == tmp_path / ".hotmodel"
    assert cfg.router.models_max == 1 and cfg.router.parallel == 1
    assert cfg.router.llama_server == ""
    assert cfg.router.port == 0
    assert cfg.switch.policy == "zero_overlap"
    assert cfg.session.token_count_mode == "auto"
    assert cfg.router_log_file == tmp_path / ".hotmodel" / "llama-server.log"


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


def test_relative_paths_resolve_against_the_file_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    path = _write(tmp_path / "conf", MINIMAL + 'log_file = "logs/router.log"\n')
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config(Path("conf/hotmodel.toml"))
    assert cfg.path == path
    assert cfg.router.models_preset == tmp_path / "conf" / "models.ini"
    assert cfg.router_log_file == tmp_path / "conf" / "logs" / "router.log"
    small = cfg.presets.models["small"]
    assert small.model_path == tmp_path / "conf" / "models" / "small.gguf"
    assert cfg.presets.models["big"].model_path == Path("/abs/big.gguf")


def test_presets_render_with_absolute_paths(tmp_path: Path) -> None:
    presets = load_presets(_write(tmp_path, MINIMAL).parent / "models.ini")
    text = presets.render()
    assert text.splitlines()[0] == "version = 1"
    assert "[*]\nc = 4096" in text
    assert f"[small]\nmodel = {tmp_path / 'models' / 'small.gguf'}\nn-gpu-layers = 99" in text
    # the rendered file parses back to the same presets
    (tmp_path / "rendered.ini").write_text(text)
    again = load_presets(tmp_path / "rendered.ini")
    assert again.models["small"].options == presets.models["small"].options


def test_example_and_demo_configs_parse() -> None:
    for name in ("models.example.toml", "demo.toml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.router.default_model in cfg.presets.models
    demo = load_config(ROOT / "configs" / "demo.toml")
    assert set(demo.presets.models) == {"smollm2", "gemma3", "smollm2-embed"}
    assert demo.presets.residents == ("smollm2-embed",)  # the embedding model: beside them


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (MINIMAL + "bogus = 1\n", "[router] bogus: unknown key"),
        (MINIMAL + "[extra]\n", "[extra]: unknown section"),
        (MINIMAL + "parallel = true\n", "[router] parallel: expected an integer, got True"),
        (MINIMAL + "models_max = 0\n", "[router] models_max: expected a value >= 1, got 0"),
        (MINIMAL + 'cache_type_k = "q9"\n', "[router] cache_type_k: expected one of 'f32'"),
        (MINIMAL + 'extra_args = "--x"\n', "[router] extra_args: expected a list of strings"),
        (MINIMAL + "[server]\nport = 70000\n", "[server] port: expected a value <= 65535"),
        (MINIMAL + '[server]\nlog_level = "loud"\n', "[server] log_level: expected one of"),
        (
            MINIMAL + '[switch]\npolicy = "overlap"\n',
            "[switch] policy: the overlap policy needs [router] models_max >= 2",
        ),
        (MINIMAL + '[session]\ntoken_count_mode = "guess"\n', "[session] token_count_mode"),
        (
            MINIMAL + '[store]\nurl = "mysql://u:secret@db/x"\n',
            '[store] url: expected "" (the SQLite file) or a postgresql:// URL, '
            "got 'mysql://u:***@db/x'",
        ),
        (MINIMAL + "[store]\nurl = 5\n", "[store] url: expected a string"),
        (MINIMAL + "[store]\npool_size = 0\n", "[store] pool_size: expected a value >= 1"),
        (
            '[router]\nmodels_preset = "models.ini"\n',
            "[router] default_model: missing required key",
        ),
        (
            '[router]\nmodels_preset = "models.ini"\ndefault_model = "nope"\n',
            "[router] default_model: 'nope' is not a preset",
        ),
        ("[server]\n", "[router]: missing section"),
        ("[router\n", "invalid TOML"),
    ],
)
def test_errors_name_file_section_and_key(tmp_path: Path, toml: str, expected: str) -> None:
    path = _write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


def test_overlap_is_accepted_with_two_models(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL + 'models_max = 2\n[switch]\npolicy = "overlap"\n'))
    assert cfg.switch.policy == "overlap"


def test_numbers_accept_integers_for_float_keys(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL + "startup_timeout_seconds = 5\n"))
    assert cfg.router.startup_timeout_seconds == 5.0
    assert isinstance(cfg.router.startup_timeout_seconds, float)


@pytest.mark.parametrize(
    ("ini", "expected"),
    [
        ("[a]\nn-gpu-layers = 1\n", "[a] model: a preset needs a 'model' path"),
        ("version = 1\n", "no model presets defined"),
        ("[a]\nmodel = x\n[a]\nmodel = y\n", "invalid INI"),
        ("garbage line\n", "invalid INI"),
    ],
)
def test_preset_errors_name_the_ini_file(tmp_path: Path, ini: str, expected: str) -> None:
    _write(tmp_path, MINIMAL, ini)
    with pytest.raises(ConfigError) as info:
        load_presets(tmp_path / "models.ini")
    assert str(info.value).startswith(str(tmp_path / "models.ini"))
    assert expected in str(info.value)


def test_missing_presets_file(tmp_path: Path) -> None:
    (tmp_path / "hotmodel.toml").write_text(MINIMAL)
    with pytest.raises(ConfigError, match=r"models\.ini: presets file not found"):
        load_config(tmp_path / "hotmodel.toml")


def test_hf_repo_preset_needs_no_model_path(tmp_path: Path) -> None:
    _write(tmp_path, MINIMAL, "[remote]\nhf-repo = org/model:Q4_K_M\n")
    presets = load_presets(tmp_path / "models.ini")
    assert presets.models["remote"].model_path is None


def test_system_prompts(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            MINIMAL
            + '[session]\ndefault_system_prompt = "p"\n[system_prompts.p]\nsystem = "Be brief."\n',
        )
    )
    assert cfg.system_prompts["p"].system == "Be brief."
    assert cfg.session.default_system_prompt == "p"
    assert cfg.session_store_file == tmp_path / ".hotmodel" / "sessions.sqlite3"
    assert cfg.store.url == ""  # the SQLite file, by default


def test_store_url_selects_postgresql_and_hides_its_password(tmp_path: Path) -> None:
    url = "postgresql://hot:s3cret@db.example:5432/hotmodel"
    cfg = load_config(_write(tmp_path, MINIMAL + f'[store]\nurl = "{url}"\npool_size = 4\n'))
    assert cfg.store.url == url and cfg.store.pool_size == 4
    assert cfg.store.shown == "postgresql://hot:***@db.example:5432/hotmodel"
    assert "s3cret" not in str(open_store(cfg))


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[system_prompts.p]\nsystem = "x"\ntone = "y"\n', "[system_prompts.p] tone: unknown key"),
        ("[system_prompts.p]\n", "[system_prompts.p] system: missing required key"),
        ("[system_prompts.p]\nsystem = 3\n", "[system_prompts.p] system: expected a string"),
        (
            '[session]\ndefault_system_prompt = "q"\n',
            "[session] default_system_prompt: 'q' is not defined",
        ),
        # the old names say what they became
        ('[presets.p]\nsystem = "x"\n', "[presets]: [presets.NAME] tables are now [system_prompts"),
        (
            '[session]\ndefault_preset = "p"\n',
            "[session] default_preset: renamed: use default_system_prompt",
        ),
    ],
)
def test_system_prompt_errors(tmp_path: Path, toml: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(_write(tmp_path, MINIMAL + toml))


def test_every_deadline_is_configurable(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            MINIMAL
            + "[server]\nshutdown_timeout_seconds = 2\n"
            + "[switch]\nreplay_timeout_seconds = 7\ncancel_grace_seconds = 1\n"
            + "switch_timeout_seconds = 30\n[session]\nqueue_timeout_seconds = 9\n",
        )
    )
    assert cfg.server.shutdown_timeout_seconds == 2.0
    assert (
        cfg.switch.replay_timeout_seconds,
        cfg.switch.cancel_grace_seconds,
        cfg.switch.switch_timeout_seconds,
    ) == (7.0, 1.0, 30.0)
    assert cfg.session.queue_timeout_seconds == 9.0


KEY = "a-client-key-of-some-length"
KEY_FP = "0f2c7d3b0f1ba6d1c1e4f1d2"  # no configured key's
SECURITY = f'[security]\napi_keys = ["{KEY}"]\n'


def test_priorities_per_preset_and_per_key_and_aging(tmp_path: Path) -> None:
    ini = INI.replace("[small]\n", "[small]\npriority = 3\n") + "priority = -2\n"
    toml = (
        MINIMAL
        + "[switch]\naging_seconds = 2\n"
        + f'[security]\napi_keys = ["{KEY}"]\n'
        + f'[security.key_priorities]\n"{fingerprint(KEY)}" = 5\n'
    )
    cfg = load_config(_write(tmp_path, toml, ini))
    assert cfg.switch.aging_seconds == 2.0
    assert cfg.presets.models["small"].priority == 3
    assert cfg.presets.models["big"].priority == -2
    assert cfg.keys.priority(fingerprint(KEY)) == 5
    assert cfg.keys.priority("someone-else") == 0
    # hotmodel's own key never reaches llama-server
    assert "priority =" not in cfg.presets.render()
    assert "priority" not in cfg.presets.models["small"].options


def test_a_global_priority_is_every_preset_default(tmp_path: Path) -> None:
    ini = INI.replace("[*]\n", "[*]\npriority = 1\n").replace("[big]\n", "[big]\npriority = 0\n")
    cfg = load_config(_write(tmp_path, MINIMAL, ini))
    assert cfg.presets.models["small"].priority == 1
    assert cfg.presets.models["big"].priority == 0
    assert "priority =" not in cfg.presets.render()


@pytest.mark.parametrize(
    ("toml", "ini", "where", "expected"),
    [
        (MINIMAL, INI.replace("[big]\n", "[big]\npriority = high\n"), "ini", "[big] priority"),
        (MINIMAL, INI.replace("[*]\n", "[*]\npriority = 1.5\n"), "ini", "[*] priority"),
        (
            MINIMAL + SECURITY + "key_priorities = 3\n",
            INI,
            "toml",
            "[security] key_priorities: expected a table",
        ),
        (
            MINIMAL + SECURITY + f'[security.key_priorities]\n"{KEY}" = 1\n',
            INI,
            "toml",
            f"[security.key_priorities] {KEY}: expected a key's fingerprint",
        ),
        (
            MINIMAL
            + f'[security]\napi_keys = ["{KEY}"]\n[security.key_priorities]\n{KEY_FP} = 1\n',
            INI,
            "toml",
            f"[security.key_priorities] {KEY_FP}: no configured key has this fingerprint",
        ),
        (MINIMAL + "[switch]\naging_seconds = -1\n", INI, "toml", "[switch] aging_seconds"),
    ],
)
def test_bad_priorities_name_file_section_and_key(
    tmp_path: Path, toml: str, ini: str, where: str, expected: str
) -> None:
    path = _write(tmp_path, toml, ini)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    named = tmp_path / "models.ini" if where == "ini" else path
    assert str(info.value).startswith(str(named) + " "), str(info.value)
    assert expected in str(info.value)


def test_a_bad_key_priority_value_is_named(tmp_path: Path) -> None:
    fp = fingerprint(KEY)
    toml = MINIMAL + SECURITY + f'[security.key_priorities]\n{fp} = "hi"\n'
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, toml))
    assert f"[security.key_priorities] {fp}: expected an integer, got 'hi'" in str(info.value)


def test_a_preset_slot_count_wins_over_the_router_one(tmp_path: Path) -> None:
    ini = INI.replace("[small]\n", "[small]\nnp = 3\n")
    cfg = load_config(_write(tmp_path, MINIMAL + "parallel = 2\n", ini))
    assert cfg.presets.slots("small", cfg.router.parallel) == 3
    assert cfg.presets.slots("big", cfg.router.parallel) == 2


def test_replay_session_is_also_read_under_its_old_name(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, MINIMAL)).switch.replay_session is True
    new = load_config(_write(tmp_path, MINIMAL + "[switch]\nreplay_session = false\n"))
    assert new.switch.replay_session is False
    old = load_config(_write(tmp_path, MINIMAL + "[switch]\nreplay = false\n"))
    assert old.switch.replay_session is False
    both = MINIMAL + "[switch]\nreplay = false\nreplay_session = true\n"
    with pytest.raises(ConfigError, match=re.escape("[switch] replay: renamed to replay_session")):
        load_config(_write(tmp_path, both))
