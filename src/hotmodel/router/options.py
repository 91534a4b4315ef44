"""What a llama-server binary offers: the options it takes, read from its ``--help``
(the presets' keys are checked against them), and the devices it can use, read
from its ``--list-devices``.

A key llama-server does not know makes the router refuse the whole presets file
when it starts (``option 'x' not recognized in preset '*'``): at ``serve`` that
was a start-up failure with a log tail to read, and after a reload a router that
could not come back. Checked here first, it is a :class:`ConfigError` naming the
file, the section and the key, and nothing is changed. A key is known when it is
an option's long or short name without dashes, its environment variable
(``LLAMA_ARG_...``), or one of the presets' own keys (llama-server's
``tools/server/README.md``). When the help cannot be read, nothing is refused:
llama-server still has the last word.

A binary that lists no device (a CPU-only build) keeps its models in ordinary
memory: a leaving model's process may then exit while the next one loads, as
there is no device memory to wait for (``control/effects.py``).
"""

from __future__ import annotations

import functools
import logging
import re
import subprocess
from pathlib import Path

from hotmodel.errors import ConfigError
from hotmodel.presets import Presets

log = logging.getLogger("hotmodel.router")

# keys of the presets file itself, not command-line arguments
PRESET_ONLY = frozenset({"load-on-startup", "stop-timeout", "dedup-cache-models"})
HELP_TIMEOUT_S = 30.0

# the names column ends at the first run of 2+ spaces not right after a comma
_COLUMN = re.compile(r"(?<![,\s])\s{2,}")
_NAME = re.compile(r"(?:^|[,\s])-{1,2}([A-Za-z0-9][\w.-]*)")
_ENV = re.compile(r"\(env: (LLAMA_\w+)\)")


def parse_help(text: str) -> frozenset[str]:
    """Every option name (without dashes) and environment variable in ``--help`` text."""
    names: set[str] = set(_ENV.findall(text))
    for line in text.splitlines():
        if line.startswith("-"):
            names.update(_NAME.findall(_COLUMN.split(line, maxsplit=1)[0]))
    return frozenset(names)


def parse_devices(text: str) -> tuple[str, ...] | None:
    """The device names in ``--list-devices`` text (``()`` for "(none)"; None when the
    text is not such a list). llama-server lists every device but the CPU, e.g.
    ``  CUDA0: NVIDIA H100 (81000 MiB, 80000 MiB free)``."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Available devices:")
    except StopIteration:
        return None
    names = []
    for line in lines[start + 1 :]:
        if line.strip() == "(none)":
            return ()
        name, colon, _ = line.strip().partition(":")
        if line.startswith(" ") and colon and name:
            names.append(name)
    return tuple(names)


def known_options(binary: Path) -> frozenset[str] | None:
    """What ``binary`` takes (None when its help cannot be read); read once per file."""
    out = _output(binary, "--help")
    if isinstance(out, str):
        log.warning("cannot read %s --help (%s): preset keys are not checked", binary, out)
        return None
    names = parse_help(out[0] + out[1])
    if len(names) < 20:  # not llama-server's help: check nothing rather than everything
        log.warning("%s --help lists no options: preset keys are not checked", binary)
        return None
    return names


def devices(binary: Path) -> tuple[str, ...] | None:
    """The devices ``binary`` can use besides the CPU (None when that cannot be read)."""
    out = _output(binary, "--list-devices")
    return None if isinstance(out, str) else parse_devices(out[0])  # the list is on stdout


def _output(binary: Path, flag: str) -> tuple[str, str] | str:
    """What ``binary flag`` prints (stdout, stderr), or why it could not be run; run
    once per file."""
    try:
        st = binary.stat()
    except OSError as exc:
        return str(exc)
    return _run(str(binary), st.st_size, st.st_mtime_ns, flag)


@functools.lru_cache(maxsize=8)
def _run(binary: str, size: int, mtime_ns: int, flag: str) -> tuple[str, str] | str:
    try:
        done = subprocess.run(
            [binary, flag],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=HELP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return done.stdout, done.stderr


def check_preset_keys(presets: Presets, known: frozenset[str] | None) -> None:
    """ConfigError for the first preset key llama-server would refuse."""
    if known is None:
        return
    sections = [("*", presets.globals), *((p.name, p.options) for p in presets.models.values())]
    for section, options in sections:
        for key in options:
            # a flag's negation ("no-X") is taken for every flag, listed or not
            base = key.removeprefix("no-")
            if not ({key, base, f"no-{key}"} & known) and key not in PRESET_ONLY:
                raise ConfigError(
                    presets.path,
                    f"llama-server has no option {key!r} (not in its --help)",
                    section=section,
                    key=key,
                )
