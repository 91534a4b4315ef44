"""A preset key reaches llama-server: what docs/development.md walks a newcomer through.

A key of a preset's section in the INI file is one of llama-server's own options
without its dashes; hotmodel checks it against the binary's ``--help``, hands the file
to the router (``--models-preset``), and the router starts the model's process with
it. hotmodel's own keys (``priority``, ``resident``) are taken out on the way.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from hotmodel.config import load_config
from tests.conftest import chat, serving_hotmodel, write_config

pytestmark = pytest.mark.slow  # drives the real llama-server


def _model_argv(router_pid: int) -> list[str]:
    (child,) = psutil.Process(router_pid).children()
    return child.cmdline()


def test_a_preset_key_reaches_the_models_process(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path
) -> None:
    config = write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny")
    ini = tmp_path / "models.ini"
    ini.write_text(ini.read_text() + "threads = 1\npriority = 3\n")
    rendered = load_config(config).presets.render()  # what the router is handed
    assert "threads = 1" in rendered and "priority" not in rendered
    with serving_hotmodel(config) as hp:
        router = hp.status()["router"]
        assert isinstance(router, dict)
        argv = _model_argv(int(router["pid"]))
        assert argv[argv.index("--threads") + 1] == "1", argv
        assert not any("priority" in a for a in argv), argv  # hotmodel's own key stayed
        assert chat(hp, max_tokens=2).status_code == 200


def test_a_sampling_preset_key_reaches_the_models_process(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path
) -> None:
    config = write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny")
    ini = tmp_path / "models.ini"
    ini.write_text(ini.read_text() + "top-k = 7\n")
    rendered = load_config(config).presets.render()  # what the router is handed
    assert "top-k = 7" in rendered
    with serving_hotmodel(config) as hp:
        router = hp.status()["router"]
        assert isinstance(router, dict)
        argv = _model_argv(int(router["pid"]))
        assert argv[argv.index("--top-k") + 1] == "7", argv
        assert chat(hp, max_tokens=2).status_code == 200
