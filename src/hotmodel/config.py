"""Configuration: the TOML file and the llama-server INI presets it points at.

Both are parsed and validated once, by :func:`load_config`, into frozen
dataclasses. Every error is a :class:`~hotmodel.errors.ConfigError` naming the
file, the section and the key. Relative paths resolve against the folder of
the file they are written in, so a config folder can be moved as a whole.
"""

from __future__ import annotations

import configparser
import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from hotmodel.errors import ConfigError

_T = TypeVar("_T")

SwitchPolicy = Literal["zero_overlap", "overlap"]
DrainTimeoutAction = Literal["fail", "cancel"]
GpuProbeKind = Literal["auto", "nvml", "nvidia-smi", "none"]
TokenCountMode = Literal["estimate", "exact", "auto"]
LogLevel = Literal["debug", "info", "warning", "error"]
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


def _meta(*, min: float | None = None, max: float | None = None, doc: str = "") -> dict[str, Any]:
    return {"min": min, "max": max, "doc": doc}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: the proxy that OpenAI clients talk to."""

    host: str = "127.0.0.1"
    port: int = field(default=18080, metadata=_meta(min=0, max=65535))
    state_dir: Path = Path(".hotmodel")
    log_level: LogLevel = "info"
    request_timeout_seconds: float = field(default=600.0, metadata=_meta(min=0.001))
    switch_drain_timeout_seconds: float = field(default=30.0, metadata=_meta(min=0))


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """``[router]``: the one managed ``llama-server`` in router mode."""

    models_preset: Path
    default_model: str
    llama_server: str = ""
    host: str = "127.0.0.1"
    port: int = field(default=0, metadata=_meta(min=0, max=65535))
    models_max: int = field(default=1, metadata=_meta(min=1))
    parallel: int = field(default=1, metadata=_meta(min=1))
    ctx_size: int = field(default=4096, metadata=_meta(min=0))
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    extra_args: tuple[str, ...] = ()
    log_file: Path | None = None
    startup_timeout_seconds: float = field(default=30.0, metadata=_meta(min=0.001))
    stop_timeout_seconds: float = field(default=10.0, metadata=_meta(min=0.001))


@dataclass(frozen=True, slots=True)
class SwitchConfig:
    """``[switch]``: how the active model is switched."""

    policy: SwitchPolicy = "zero_overlap"
    auto: bool = False
    replay: bool = True
    drain_timeout_action: DrainTimeoutAction = "fail"
    load_timeout_seconds: float = field(default=120.0, metadata=_meta(min=0.001))
    unload_timeout_seconds: float = field(default=30.0, metadata=_meta(min=0.001))
    settle_timeout_seconds: float = field(default=10.0, metadata=_meta(min=0))
    settle_tolerance_mib: int = field(default=64, metadata=_meta(min=0))
    gpu_probe: GpuProbeKind = "auto"
    queue_timeout_seconds: float = field(default=60.0, metadata=_meta(min=0))
    history: int = field(default=50, metadata=_meta(min=1))


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """``[session]``: bounds on the context kept and replayed per session."""

    max_session_messages: int = field(default=64, metadata=_meta(min=1))
    max_prompt_chars: int = field(default=32000, metadata=_meta(min=1))
    max_prompt_tokens: int = field(default=0, metadata=_meta(min=0))
    token_count_mode: TokenCountMode = "auto"
    default_preset: str = ""
    store_file: Path | None = None


@dataclass(frozen=True, slots=True)
class PromptPreset:
    """``[presets.NAME]``: a named system prompt, applied to every request of a session."""

    system: str


@dataclass(frozen=True, slots=True)
class Preset:
    """One model section of the INI presets file."""

    name: str
    options: Mapping[str, str]
    model_path: Path | None


@dataclass(frozen=True, slots=True)
class Presets:
    """The INI presets file: global ``[*]`` options, then one entry per model."""

    path: Path
    top: Mapping[str, str]
    globals: Mapping[str, str]
    models: Mapping[str, Preset]

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


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration."""

    path: Path
    server: ServerConfig
    router: RouterConfig
    switch: SwitchConfig
    session: SessionConfig
    presets: Presets
    prompts: Mapping[str, PromptPreset] = field(default_factory=dict)

    @property
    def router_log_file(self) -> Path:
        return self.router.log_file or self.server.state_dir / "llama-server.log"

    @property
    def session_store_file(self) -> Path:
        return self.session.store_file or self.server.state_dir / "sessions.sqlite3"


# Keys whose values are file paths; llama-server's own long and short names.
_PATH_KEYS = frozenset(
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


def load_config(path: str | Path) -> Config:
    """Read, parse and validate the TOML config and the INI presets it names."""
    path = Path(path).absolute()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read config file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"invalid TOML: {exc}") from exc
    return parse_config(raw, path)


def parse_config(raw: Mapping[str, Any], path: Path) -> Config:
    """Validate an already-decoded TOML document that was read from ``path``."""
    base = path.parent
    known = {"server", "router", "switch", "session", "presets"}
    for name, value in raw.items():
        if name not in known:
            raise ConfigError(
                path, f"unknown section (expected one of: {', '.join(sorted(known))})", section=name
            )
        if not isinstance(value, dict):
            raise ConfigError(path, "must be a table", section=name)
    if "router" not in raw:
        raise ConfigError(
            path, "missing section (it names the presets file and default model)", section="router"
        )
    server = _build(ServerConfig, raw.get("server", {}), path, "server", base)
    router = _build(RouterConfig, raw["router"], path, "router", base)
    switch = _build(SwitchConfig, raw.get("switch", {}), path, "switch", base)
    session = _build(SessionConfig, raw.get("session", {}), path, "session", base)
    prompts = {}
    for name, table in raw.get("presets", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(
                path, "must be a table with a 'system' key", section=f"presets.{name}"
            )
        prompts[name] = _build(PromptPreset, table, path, f"presets.{name}", base)
    if session.default_preset and session.default_preset not in prompts:
        raise ConfigError(
            path,
            f"{session.default_preset!r} is not defined as [presets.{session.default_preset}]",
            section="session",
            key="default_preset",
        )

    if switch.policy == "overlap" and router.models_max < 2:
        raise ConfigError(
            path,
            "the overlap policy needs [router] models_max >= 2",
            section="switch",
            key="policy",
        )
    presets = load_presets(router.models_preset)
    if router.default_model not in presets.models:
        names = ", ".join(presets.models) or "none"
        raise ConfigError(
            path,
            f"{router.default_model!r} is not a preset in "
            f"{router.models_preset} (presets: {names})",
            section="router",
            key="default_model",
        )
    return Config(
        path=path,
        server=server,
        router=router,
        switch=switch,
        session=session,
        presets=presets,
        prompts=prompts,
    )


def _build(cls: type[_T], table: Mapping[str, Any], path: Path, section: str, base: Path) -> _T:
    """Build one section's dataclass from its TOML table, checking every key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in table:
        if key not in fields:
            raise ConfigError(
                path, f"unknown key (known keys: {', '.join(fields)})", section=section, key=key
            )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(path, "missing required key", section=section, key=name)
            if hints[name] is Path and isinstance(f.default, Path):
                values[name] = _resolve(base, f.default)
            continue
        values[name] = _coerce(table[name], hints[name], f.metadata, path, section, name, base)
    return cls(**values)


def _coerce(
    value: Any, hint: Any, meta: Mapping[str, Any], path: Path, section: str, key: str, base: Path
) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(path, f"expected {expected}, got {value!r}", section=section, key=key)

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # only "Path | None" is used
        if value == "":
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = None
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise fail("one of " + ", ".join(repr(c) for c in choices))
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if hint is int or hint is float:
        ok = isinstance(value, int) or (hint is float and isinstance(value, float))
        if isinstance(value, bool) or not ok:
            raise fail("an integer" if hint is int else "a number")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise fail(f"a value >= {lo}")
        if hi is not None and value > hi:
            raise fail(f"a value <= {hi}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise fail("a non-empty path string")
        return _resolve(base, Path(value))
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail("a list of strings")
        return tuple(value)
    raise TypeError(f"unsupported config type {hint!r}")  # a bug in this module, not in a config


def _resolve(base: Path, value: Path) -> Path:
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
    models: dict[str, Preset] = {}
    for name in parser.sections():
        if name == _TOP_SECTION:
            continue
        options = {k: _resolve_option(base, k, v) for k, v in parser[name].items()}
        if name == "*":
            global_opts = options
            continue
        model_key = next((k for k in _MODEL_KEYS if k in options), None)
        if model_key is None and not any(k in options for k in _REMOTE_KEYS):
            raise ConfigError(
                path, "a preset needs a 'model' path (or an hf-repo)", section=name, key="model"
            )
        model_path = Path(options[model_key]) if model_key else None
        models[name] = Preset(name=name, options=options, model_path=model_path)
    if not models:
        raise ConfigError(path, "no model presets defined")
    return Presets(path=path, top=top, globals=global_opts, models=models)


def _resolve_option(base: Path, key: str, value: str) -> str:
    if key in _PATH_KEYS and value:
        return str(_resolve(base, Path(value)))
    return value
