"""State files are the user's alone: conversations, KV snapshots and logs hold prompts.

On POSIX, hotmodel runs with umask 077 from the moment its runtime starts, so
every file it or llama-server creates (the session store and its WAL, KV
snapshots and their sidecars, logs, the pid file, the rendered presets) is
0600 and every folder 0700; what an older version left readable by others is
narrowed at start (group and others lose every right; the owner keeps its
own). On Windows the state folder's ACL is replaced by one that grants the
current user alone full control, inherited by everything created in it
(``icacls``, which every Windows has; no shell involved).
"""

from __future__ import annotations

import getpass
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("hotmodel.private")

PRIVATE_UMASK = 0o077


def private_umask() -> None:
    """Files and folders created from now on are the user's only (POSIX; no-op elsewhere)."""
    if os.name == "posix":
        os.umask(PRIVATE_UMASK)


def make_private(state_dir: Path, files: Iterable[Path] = ()) -> None:
    """Create ``state_dir`` if needed and make it, everything in it, and ``files`` (kept
    elsewhere by the config: a log, the store) readable by this user alone."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if sys.platform == "win32":
        _windows_acl(state_dir)
        return
    _narrow(state_dir)
    for path in state_dir.rglob("*"):
        _narrow(path)
    for path in files:
        if path.exists():
            _narrow(path)


def _narrow(path: Path) -> None:
    try:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            return  # a link's target is not ours to change
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:  # only what others may do goes: the owner keeps what it had
            path.chmod(mode & ~0o077)
    except OSError as exc:  # another user's file in our folder: say so, go on
        log.warning("could not make %s private: %s", path, exc)


def _windows_acl(folder: Path) -> None:
    user = getpass.getuser()
    argv = ["icacls", str(folder), "/inheritance:r", "/grant:r", f"{user}:(OI)(CI)F", "/T", "/Q"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not restrict %s to %s (icacls): %s", folder, user, exc)
        return
    if done.returncode != 0:
        log.warning("could not restrict %s to %s (icacls): %s", folder, user, done.stdout.strip())
