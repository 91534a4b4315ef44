"""The two tiers: `pytest -m "not slow"` must never start a llama-server.

conftest.py refuses a run in which a test uses the real-server fixtures (or lives in a
``*_real.py`` module) without the ``slow`` marker, and fails a test that starts
``hotmodel serve`` unmarked. These run pytest itself, in a subprocess, on small test
files written here, with this repository's conftest and pytest settings.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Plugins these runs do not need, left out so that each starts in a second or two.
QUICK = ("-p", "no:cacheprovider", "-p", "no:schemathesis", "-p", "no:hypothesispytest")


def _pytest(*args: str | Path, conftest: bool = True) -> subprocess.CompletedProcess[str]:
    """pytest with this repository's settings; ``conftest`` loads tests/conftest.py for
    files outside tests/ (a file inside tests/ gets it anyway)."""
    argv = [sys.executable, "-m", "pytest", "-c", "pyproject.toml", "-q", *QUICK]
    argv += ["-p", "tests.conftest"] if conftest else []
    argv += [str(a) for a in args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_an_unmarked_real_test_refuses_the_run_and_is_named(tmp_path: Path) -> None:
    """One uses the real-server fixture, the other lives in a *_real.py module."""
    uses = tmp_path / "test_new.py"
    uses.write_text(
        "from pathlib import Path\n\n"
        "def test_uses_the_fixture(llama_server: Path) -> None:\n"
        "    assert llama_server\n"
    )
    named = tmp_path / "test_thing_real.py"
    named.write_text("def test_in_a_real_module() -> None:\n    assert True\n")
    plain = tmp_path / "test_plain.py"
    plain.write_text("def test_plain() -> None:\n    assert True\n")
    done = _pytest("--collect-only", "-m", "not slow", uses, named, plain)
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error
    assert "not marked slow" in done.stderr
    assert "test_uses_the_fixture" in done.stderr
    assert "test_in_a_real_module" in done.stderr
    assert "test_plain" not in done.stderr


def test_a_marked_real_test_is_left_out_of_the_fast_tier(tmp_path: Path) -> None:
    real = tmp_path / "test_marked_real.py"
    real.write_text(
        "from pathlib import Path\n\nimport pytest\n\n"
        "pytestmark = pytest.mark.slow\n\n"
        "def test_marked(llama_server: Path) -> None:\n"
        "    assert llama_server\n\n"
    )
    done = _pytest("--collect-only", "-m", "not slow", real)
    assert done.returncode == 5, done.stdout + done.stderr  # nothing collected
    assert "1 deselected" in done.stdout


def test_starting_hotmodel_unmarked_fails_and_a_hang_fails_naming_the_test(
    tmp_path: Path,
) -> None:
    """The runtime guard (a test that starts hotmodel with no fixture) and the per-test
    timeout: each fails its own test, named, and the run goes on."""
    tests = tmp_path / "test_guards.py"
    tests.write_text(
        "import time\nfrom pathlib import Path\n\nimport pytest\n\n"
        "from tests.conftest import start_hotmodel\n\n"
        "def test_sneaky(tmp_path: Path) -> None:\n"
        "    start_hotmodel(tmp_path / 'absent.toml')\n\n"
        "@pytest.mark.timeout(1)\n"
        "def test_hangs() -> None:\n"
        "    time.sleep(60)\n\n"
        "def test_after() -> None:\n"
        "    assert True\n"
    )
    done = _pytest(tests)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "starts hotmodel serve but is not marked slow" in done.stdout
    assert "Timeout" in done.stdout
    assert "FAILED" in done.stdout and "test_hangs" in done.stdout
    assert "2 failed, 1 passed" in done.stdout


def test_the_benchmark_smoke_is_slow() -> None:
    """It runs scripts/bench.py in a subprocess (no fixture says so): conftest marks it."""
    fast = _pytest("--collect-only", "-m", "not slow", "tests/test_bench_smoke.py", conftest=False)
    assert fast.returncode == 5, fast.stdout + fast.stderr
    assert "deselected" in fast.stdout


def test_a_fresh_machine_gets_the_timeout_plugin() -> None:
    """bootstrap.py installs the dev extras, which carry pytest-timeout; the default
    timeout is set for every test."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["tool"]["pytest"]["ini_options"]["timeout"] >= 300
    dev = project["project"]["optional-dependencies"]["dev"]
    assert any(d.startswith("pytest-timeout") for d in dev), dev
    assert '".[dev]" if dev' in (ROOT / "scripts" / "bootstrap.py").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_hotmodel_left_running_is_killed_and_fails_the_test(
    tmp_path: Path, llama_server: Path
) -> None:
    leaky = tmp_path / "test_leaky.py"
    leaky.write_text(
        "from pathlib import Path\n\nimport pytest\n\n"
        "from tests.conftest import start_hotmodel, write_config\n\n"
        "pytestmark = pytest.mark.slow\n\n"
        "def test_leaks(tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path)"
        " -> None:\n"
        "    hp = start_hotmodel(write_config(tmp_path, {'tiny': tiny_models['tiny']}, 'tiny'))\n"
        "    (tmp_path.parent.parent / 'leaked.pid').write_text(str(hp.proc.pid))\n"
    )
    done = _pytest(leaky, "--basetemp", tmp_path / "run")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the test left hotmodel serve running (killed now)" in done.stdout
    assert "1 passed, 1 error" in done.stdout  # the test passed; its teardown failed
    pid = int((tmp_path / "leaked.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
