"""Resident companions (``resident = true``): the preset key, the router's model count,
the scheduler's view of their requests, and the control loop's commands for them, all
pure or with recording fakes (the real router is in test_residents_real.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotmodel.config import load_config
from hotmodel.errors import ConfigError
from hotmodel.presets import load_presets
from hotmodel.router.supervisor import router_argv

INI = """version = 1

[*]
c = 2048

[chat]
model = chat.gguf

[other]
model = other.gguf

[embed]
model = embed.gguf
resident = true
"""
TOML = '[router]\nmodels_preset = "m.ini"\ndefault_model = "chat"\n'


def _write(folder: Path, ini: str = INI, toml: str = TOML) -> Path:
    (folder / "m.ini").write_text(ini)
    path = folder / "c.toml"
    path.write_text(toml)
    return path


def test_resident_is_parsed_and_never_rendered_for_the_router(tmp_path: Path) -> None:
    presets = load_presets(_write(tmp_path).with_name("m.ini"))
    assert presets.residents == ("embed",)
    assert presets.models["embed"].resident and not presets.models["chat"].resident
    assert "resident" not in presets.models["embed"].options
    rendered = presets.render()
    assert "[embed]" in rendered
    assert not [line for line in rendered.splitlines() if line.startswith("resident")]


@pytest.mark.parametrize("value", ["True", "FALSE", " true "])
def test_resident_values_ignore_case(tmp_path: Path, value: str) -> None:
    presets = load_presets(_write(tmp_path, INI.replace("= true", f"= {value}")).parent / "m.ini")
    assert presets.models["embed"].resident is (value.strip().lower() == "true")


@pytest.mark.parametrize(
    ("ini", "expected"),
    [
        (INI.replace("resident = true", "resident = yes"), "[embed] resident: expected true or "),
        (INI.replace("resident = true", "resident ="), "[embed] resident: expected true or false"),
        (INI.replace("c = 2048", "resident = true"), "[*] resident: resident applies to one"),
    ],
)
def test_bad_resident_values_name_file_section_and_key(
    tmp_path: Path, ini: str, expected: str
) -> None:
    path = _write(tmp_path, ini).with_name("m.ini")
    with pytest.raises(ConfigError) as info:
        load_presets(path)
    assert str(info.value).startswith(f"{path} {expected}")


def test_the_default_model_cannot_be_resident(tmp_path: Path) -> None:
    path = _write(tmp_path, toml=TOML.replace('"chat"', '"embed"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path} [router] default_model: 'embed' is resident")


def test_models_max_leaves_room_for_each_resident(tmp_path: Path) -> None:
    two = INI + "\n[rerank]\nmodel = rerank.gguf\nresident = true\n"
    cfg = load_config(_write(tmp_path, two, TOML + "models_max = 2\n"))
    argv = router_argv(cfg, Path("/bin/llama-server"), Path("/s/p.ini"), 4242)
    assert argv[argv.index("--models-max") + 1] == "4"  # 2 switched + 2 residents
    spare = router_argv(cfg, Path("/bin/llama-server"), Path("/s/p.ini"), 4242, spare=True)
    assert spare[spare.index("--models-max") + 1] == "5"
    none = load_config(_write(tmp_path, INI.replace("resident = true", ""), TOML))
    argv = router_argv(none, Path("/bin/llama-server"), Path("/s/p.ini"), 4242)
    assert argv[argv.index("--models-max") + 1] == "1"
