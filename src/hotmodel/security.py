"""API keys: who may call ``/v1/*`` and ``/admin/*``, loaded once with the config.

Keys come from ``[security]`` in the TOML (``api_keys``, ``admin_keys``), from
key files (``api_keys_file``, ``admin_keys_file``: one key a line, ``#``
comments), and from the environment (``HOTMODEL_API_KEYS``,
``HOTMODEL_ADMIN_KEYS``: comma-separated), never from the command line (it
shows in process lists). With no key anywhere, hotmodel is open, as on
loopback by default. With client keys, ``/v1/*`` needs one of them (or an
admin key); ``/admin/*`` needs an admin key whenever any key is configured.
Keys are compared in constant time; a request is known by the key's
fingerprint (a hash), which also owns the sessions it creates.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotmodel.errors import ConfigError

log = logging.getLogger("hotmodel.security")

API_KEYS_ENV = "HOTMODEL_API_KEYS"
ADMIN_KEYS_ENV = "HOTMODEL_ADMIN_KEYS"


class Access(enum.Enum):
    CLIENT = "client"
    ADMIN = "admin"


def fingerprint(key: str) -> str:
    """What identifies a key's owner in the store: never the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class KeySet:
    client: tuple[str, ...] = field(default=(), repr=False)
    admin: tuple[str, ...] = field(default=(), repr=False)
    # (fingerprint, priority): the scheduler's priority of a key's waiting requests
    # (``[security] key_priorities``); a key not named has 0
    priorities: tuple[tuple[str, int], ...] = ()

    def priority(self, owner: str) -> int:
        """The priority of requests sent with the key whose fingerprint is ``owner``."""
        return next((p for fp, p in self.priorities if fp == owner), 0)

    @property
    def enabled(self) -> bool:
        return bool(self.client or self.admin)

    def check(self, presented: str | None) -> Access | None:
        """Which access ``presented`` grants (None: none). Every key is compared, in
        constant time, so timing says nothing about which key was close."""
        if presented is None:
            return None
        given = presented.encode("utf-8", errors="replace")
        is_admin = _any_equal(given, self.admin)
        is_client = _any_equal(given, self.client)
        if is_admin:
            return Access.ADMIN
        return Access.CLIENT if is_client else None


def _any_equal(given: bytes, keys: Iterable[str]) -> bool:
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode("utf-8"))
    return found


def load_keys(
    table: Mapping[str, Any], path: Path, environ: Mapping[str, str] | None = None
) -> KeySet:
    """``[security]`` plus key files plus the environment, validated (errors name the key)."""
    env = os.environ if environ is None else environ
    client = [*_listed(table, "api_keys", path), *_from_file(table, "api_keys_file", path)]
    admin = [*_listed(table, "admin_keys", path), *_from_file(table, "admin_keys_file", path)]
    if table.get("api_keys") or table.get("admin_keys"):
        warn_if_shared(path)
    client += [k.strip() for k in env.get(API_KEYS_ENV, "").split(",") if k.strip()]
    admin += [k.strip() for k in env.get(ADMIN_KEYS_ENV, "").split(",") if k.strip()]
    for key in (*client, *admin):
        if (
            len(key) < 16
            or not key.isascii()
            or any(c.isspace() for c in key)
            or not key.isprintable()
        ):
            raise ConfigError(
                path,
                "every API key must be at least 16 printable ASCII characters without spaces",
                section="security",
            )
    client, admin = list(dict.fromkeys(client)), list(dict.fromkeys(admin))
    priorities = _priorities(table, {fingerprint(k) for k in (*client, *admin)}, path)
    return KeySet(tuple(client), tuple(admin), priorities)


def _priorities(
    table: Mapping[str, Any], known: set[str], path: Path
) -> tuple[tuple[str, int], ...]:
    """``[security] key_priorities``: a key's fingerprint (so that the key itself need not
    be written again, wherever it comes from) to an integer priority."""
    value = table.get(PRIORITIES, {})
    if not isinstance(value, dict):
        raise ConfigError(
            path,
            "expected a table of key fingerprints to integers",
            section="security",
            key=PRIORITIES,
        )
    section = f"security.{PRIORITIES}"
    for name, priority in value.items():
        if not _FINGERPRINT.fullmatch(name):
            raise ConfigError(
                path,
                "expected a key's fingerprint: the first 24 hex digits of its SHA-256 "
                "(printf %s KEY | sha256sum | cut -c1-24), never the key itself",
                section=section,
                key=name,
            )
        if name not in known:
            raise ConfigError(path, "no configured key has this fingerprint", section, name)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(path, f"expected an integer, got {priority!r}", section, name)
    return tuple(value.items())


def _listed(table: Mapping[str, Any], name: str, path: Path) -> list[str]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, "expected a list of strings", section="security", key=name)
    return list(value)


def _from_file(table: Mapping[str, Any], name: str, path: Path) -> list[str]:
    value = table.get(name, "")
    if not isinstance(value, str):
        raise ConfigError(path, "expected a path string", section="security", key=name)
    if not value:
        return []
    file = Path(value).expanduser()
    file = file if file.is_absolute() else path.parent / file
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read {file}: {exc}", section="security", key=name) from exc
    warn_if_shared(file)
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def warn_if_shared(file: Path) -> None:
    """Keys in a file other users may read are theirs too: say so (as ssh does), once per
    load. POSIX only (a Windows file's ACL is not a mode)."""
    if os.name != "posix":
        return
    try:
        mode = stat.S_IMODE(file.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "%s holds API keys and other users may read it (mode %s): chmod 600 %s",
            file,
            oct(mode),
            file,
        )


PRIORITIES = "key_priorities"
_FINGERPRINT = re.compile(r"[0-9a-f]{24}")
KNOWN_KEYS = frozenset({"api_keys", "admin_keys", "api_keys_file", "admin_keys_file", PRIORITIES})
