"""llama-server's INI presets file (``--models-preset``), parsed once into frozen objects.

Each section is a *preset*: one model llama-server can load, keys being its
command-line arguments without dashes. Relative paths resolve against the
INI's folder (llama-server alone would resolve them against its working
directory), and every error names the file and the section.

A few keys are hotmodel's own (:data:`HOTMODEL_KEYS`): they are taken out of the
preset's options here, so the file rendered for the router never carries them
(llama-server would refuse a key it does not know). ``resident = true`` marks a
*companion*: a model loaded at start that stays loaded beside whichever model
the switches move (``control/residents.py``).
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hotmodel.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Preset:
    """One model section of the INI presets file."""

    name: str
    options: Mapping[str, str]  # llama-server's own keys only (hotmodel's are taken out)
    model_path: Path | None
    # the scheduler's priority for requests waiting for this model (hotmodel's own key:
    # never passed to llama-server); ``[*] priority`` is the default
    priority: int = 0
    # loaded at start and kept beside the switched model; never a switch target
    resident: bool = False


@dataclass(frozen=True, slots=True)
class Presets:
    """The INI presets file: global ``[*]`` options, then one entry per model."""

    path: Path
    top: Mapping[str, str]
    globals: Mapping[str, str]
    models: Mapping[str, Preset]

    @property
    def residents(self) -> tuple[str, ...]:
        """The presets marked ``resident = true``, in file order."""
        return tuple(name for name, preset in self.models.items() if preset.resident)

    def bounds_generation(self, name: str) -> bool:
        """Whether preset ``name`` (or ``[*]``) sets llama-server's own default answer length
        (``n-predict``), which then applies to a request that sets none."""
        preset = self.models.get(name)
        own = preset.options if preset is not None else {}
        return any(k in options for options in (own, self.globals) for k in _PREDICT_KEYS)

    def slots(self, name: str, default: int) -> int:
        """How many requests preset ``name`` serves at once: its own ``parallel``/``np``,
        else ``[*]``'s, else ``default`` (``[router] parallel``, hotmodel's ``--parallel``)."""
        preset = self.models.get(name)
        for options in (preset.options if preset is not None else {}, self.globals):
            for key in _SLOT_KEYS:
                value = options.get(key, "")
                if value.strip().isdigit() and int(value) > 0:
                    return int(value)
        return default

    def render(self) -> str:
        """The INI text handed to llama-server, with every path made absolute.

        llama-server resolves relative paths against its own working
        directory; hotmodel resolves them against the INI's folder instead,
        which is what a user editing the file expects.
        """
        lines = [f"{k} = {v}" for k, v in self.top.items()]
        if self.globals:
            lines += ["", "[*]", *(f"{k} = {v}" for k, v in self.globals.items())]
        for preset in self.models.values():
            lines += ["", f"[{preset.name}]", *(f"{k} = {v}" for k, v in preset.options.items())]
        return "\n".join(lines) + "\n"


# Keys whose values are file paths; llama-server's own long and short names.
PATH_KEYS = frozenset(
    {
        "model",
        "m",
        "mmproj",
        "model-draft",
        "md",
        "lora",
        "chat-template-file",
        "control-vector",
        "grammar-file",
        "json-schema-file",
        "slot-save-path",
    }
)
_MODEL_KEYS = ("model", "m")
_REMOTE_KEYS = ("hf-repo", "hf", "hfr", "model-url", "mu", "docker-repo", "dr")
_TOP_SECTION = "hotmodel:top"
RESIDENT_KEY = "resident"
# hotmodel's own preset keys: read here, never handed to llama-server
HOTMODEL_KEYS = frozenset({RESIDENT_KEY})
_BOOLEANS = {"true": True, "false": False}


_PREDICT_KEYS = ("n-predict", "n_predict", "predict", "n")
_SLOT_KEYS = ("parallel", "np")
PRIORITY_KEY = "priority"  # hotmodel's own preset key: taken out of what llama-server reads


def resolve_path(base: Path, value: Path) -> Path:
    value = value.expanduser()
    return value if value.is_absolute() else (base / value).resolve()


def load_presets(path: Path) -> Presets:
    """Parse llama-server's INI presets file (``--models-preset``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "presets file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read presets file: {exc}") from exc
    # llama-server accepts keys (e.g. ``version = 1``) before the first section.
    parser = configparser.ConfigParser(
        interpolation=None,
        strict=True,
        default_section="hotmodel:no-defaults",
        comment_prefixes=(";", "#"),
        inline_comment_prefixes=None,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        parser.read_string(f"[{_TOP_SECTION}]\n{text}", source=str(path))
    except configparser.Error as exc:
        raise ConfigError(path, f"invalid INI: {exc}") from exc

    base = path.parent
    top = dict(parser[_TOP_SECTION])
    global_opts: dict[str, str] = {}
    found: dict[str, tuple[dict[str, str], Path | None, int | None, bool]] = {}
    default_priority = 0
    for name in parser.sections():
        if name == _TOP_SECTION:
            continue
        options = {k: _resolve_option(base, k, v) for k, v in parser[name].items()}
        priority = _priority(options, path, name)
        if name == "*":
            if RESIDENT_KEY in options:
                raise ConfigError(
                    path,
                    "resident applies to one preset's own section, not to [*]",
                    section=name,
                    key=RESIDENT_KEY,
                )
            global_opts, default_priority = options, priority or 0
            continue
        resident = _flag(path, name, options.pop(RESIDENT_KEY, "false"))
        model_key = next((k for k in _MODEL_KEYS if k in options), None)
        if model_key is None and not any(k in options for k in _REMOTE_KEYS):
            raise ConfigError(
                path, "a preset needs a 'model' path (or an hf-repo)", section=name, key="model"
            )
        model_path = Path(options[model_key]) if model_key else None
        found[name] = (options, model_path, priority, resident)
    if not found:
        raise ConfigError(path, "no model presets defined")
    # [*] may come after the presets: its priority is the default of every one
    models = {
        name: Preset(name, options, model, default_priority if own is None else own, resident)
        for name, (options, model, own, resident) in found.items()
    }
    return Presets(path=path, top=top, globals=global_opts, models=models)


def _priority(options: dict[str, str], path: Path, section: str) -> int | None:
    """Take hotmodel's ``priority`` out of a section's options (llama-server does not know
    it): an integer, None when the section sets none."""
    raw = options.pop(PRIORITY_KEY, None)
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(
            path, f"expected an integer, got {raw!r}", section=section, key=PRIORITY_KEY
        ) from None


def _flag(path: Path, section: str, value: str) -> bool:
    """``resident``'s value: true or false (any case), else a ConfigError naming it."""
    flag = _BOOLEANS.get(value.strip().lower())
    if flag is None:
        raise ConfigError(
            path, f"expected true or false, got {value!r}", section=section, key=RESIDENT_KEY
        )
    return flag


def _resolve_option(base: Path, key: str, value: str) -> str:
    if key in PATH_KEYS and value:
        return str(resolve_path(base, Path(value)))
    return value


GGUF_MAGIC = b"GGUF"


def check_model_file(presets: Presets, name: str) -> None:
    """Fail now, with nothing changed, when preset ``name``'s GGUF cannot be loaded:
    the file is missing, unreadable, or not a GGUF file at all (a remote preset,
    ``hf-repo``, has no local file to check)."""
    preset = presets.models[name]
    path = preset.model_path
    if path is None:
        return
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except FileNotFoundError:
        raise ConfigError(
            presets.path, f"model file not found: {path}", section=name, key="model"
        ) from None
    except OSError as exc:
        raise ConfigError(
            presets.path, f"model file cannot be read: {exc}", section=name, key="model"
        ) from exc
    if magic != GGUF_MAGIC:
        raise ConfigError(
            presets.path,
            f"{path} is not a GGUF file (it does not start with 'GGUF')",
            section=name,
            key="model",
        )
