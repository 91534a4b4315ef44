"""The coding agents' CLIs that tests/test_agents_real.py points at hotmodel: Claude Code
(Anthropic Messages) and Codex (OpenAI Responses), pinned, installed from the npm
registry into hotmodel's cache (``<cache>/npm/<package>-<version>/``), outside the work
tree.

``python -m tests.agent_clis`` installs both (``scripts/bootstrap.py test`` runs it);
without npm it says so and installs nothing (the real test then fails, naming what is
missing). Standard library and hotmodel only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hotmodel.router.provision import cache_root


@dataclass(frozen=True)
class Cli:
    package: str  # on the npm registry
    version: str  # exact: what the README says was tested
    command: str  # the executable npm puts in node_modules/.bin

    @property
    def prefix(self) -> Path:
        name = self.package.rsplit("/", 1)[-1]
        return cache_root() / "npm" / f"{name}-{self.version}"

    @property
    def binary(self) -> Path:
        suffix = ".cmd" if sys.platform == "win32" else ""
        return self.prefix / "node_modules" / ".bin" / f"{self.command}{suffix}"


CLAUDE_CODE = Cli("@anthropic-ai/claude-code", "2.1.332", "claude")
CODEX = Cli("@openai/codex", "0.171.0", "codex")
CLIS = (CLAUDE_CODE, CODEX)


def missing(cli: Cli) -> str:
    """Why a test cannot run ``cli``: how to install it."""
    return (
        f"{cli.binary} is missing: run `python3 scripts/bootstrap.py test` (it installs "
        f"{cli.package}@{cli.version} with npm), or `python -m tests.agent_clis`"
    )


def install() -> int:
    """Install each CLI not installed yet; 0 when both are there (or npm is absent)."""
    npm = shutil.which("npm")
    if npm is None:
        print(
            "npm not found: Claude Code and Codex are not installed, and "
            "tests/test_agents_real.py will fail (install Node.js 20+ with npm)",
            flush=True,
        )
        return 0
    failed = 0
    for cli in CLIS:
        if cli.binary.exists():
            print(f"{cli.package}@{cli.version}: {cli.binary}", flush=True)
            continue
        print(f"installing {cli.package}@{cli.version} into {cli.prefix}", flush=True)
        cli.prefix.mkdir(parents=True, exist_ok=True)
        argv = [npm, "install", "--prefix", str(cli.prefix), "--no-audit", "--no-fund"]
        code = subprocess.call([*argv, f"{cli.package}@{cli.version}"])
        if code != 0 or not cli.binary.exists():
            print(f"npm could not install {cli.package}@{cli.version} ({code})", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(install())
