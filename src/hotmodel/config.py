"""Configuration: hotmodel's TOML file (and, through ``presets.py``, the INI it names).

Both are parsed and validated once, by :func:`load_config`, into frozen
dataclasses. Every error is a :class:`~hotmodel.errors.ConfigError` naming the
file, the section and the key. Relative paths resolve against the folder of
the file they are written in, so a config folder can be moved as a whole.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from hotmodel.errors import ConfigError
from hotmodel.presets import Presets, load_presets, resolve_path
from hotmodel.security import KNOWN_KEYS, KeySet, load_keys

_T = TypeVar("_T")

# old key -> its new name, per section: the old one is still read, as the new one
ALIASES: dict[str, dict[str, str]] = {"switch": {"replay": "replay_session"}}

SwitchPolicy = Literal["zero_overlap", "overlap", "auto"]
DrainTimeoutAction = Literal["fail", "cancel"]
GpuProbeKind = Literal["auto", "nvml", "nvidia-smi", "none"]
TokenCountMode = Literal["estimate", "exact", "auto"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
AutoAccess = Literal["any", "admin"]
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
    log_format: LogFormat = "text"
    request_timeout_seconds: float = field(default=600.0, metadata=_meta(min=0.001))
    switch_drain_timeout_seconds: float = field(default=30.0, metadata=_meta(min=0))
    shutdown_timeout_seconds: float = field(default=5.0, metadata=_meta(min=0))
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata=_meta(min=1024))
    max_messages: int = field(default=2048, metadata=_meta(min=1))
    # max_tokens for a chat request that sets none (max_tokens, max_completion_tokens,
    # n_predict) on a preset with no n-predict of its own: no request holds a model forever
    default_max_tokens: int = field(default=4096, metadata=_meta(min=0))
    # Host names besides the loopback names and ``host`` itself that requests may name in
    # their Host header (DNS rebinding: a page whose name points at 127.0.0.1 is refused)
    allowed_hosts: tuple[str, ...] = ()
    # Origins (``scheme://host[:port]``) of web pages that may call this server from a
    # browser: they pass the cross-site check and get CORS headers. Empty: no CORS at all.
    allowed_origins: tuple[str, ...] = ()


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
    direct: bool = True
    restart_attempts: int = field(default=5, metadata=_meta(min=0))
    restart_backoff_seconds: float = field(default=0.5, metadata=_meta(min=0))
    watchdog_interval_seconds: float = field(default=5.0, metadata=_meta(min=0))
    watchdog_failures: int = field(default=3, metadata=_meta(min=1))
    # 0: never. Else unload the model after this many seconds without requests
    # (KV snapshot first); the next request loads it back.
    idle_unload_seconds: float = field(default=0.0, metadata=_meta(min=0))
    preload: bool = True  # load default_model at start (false: at the first request)


@dataclass(frozen=True, slots=True)
class SwitchConfig:
    """``[switch]``: how the active model is switched."""

    policy: SwitchPolicy = "zero_overlap"
    auto: bool = False
    # who may cause an auto switch when keys are set: any key, or only an admin key
    auto_access: AutoAccess = "any"
    # the scheduler (control/scheduler.py): a waiter of another model waits at most this
    # long while the loaded one keeps busy; the loaded one keeps its turn while its next
    # request comes within linger_seconds, and stays at least min_resident_seconds
    max_wait_seconds: float = field(default=10.0, metadata=_meta(min=0))
    linger_seconds: float = field(default=0.5, metadata=_meta(min=0))
    min_resident_seconds: float = field(default=0.0, metadata=_meta(min=0))
    max_queue: int = field(default=256, metadata=_meta(min=1))
    # priorities (a preset's ``priority``, [security] key_priorities) and aging: a waiter
    # gains one priority point per aging_seconds waited (so one point is worth that much
    # waiting; 0: priorities are ignored)
    aging_seconds: float = field(default=5.0, metadata=_meta(min=0))
    # after a switch, replay the conversation it is for (else the most recently used one)
    # into the new model, so that its next turn finds the prompt in the KV cache
    replay_session: bool = True
    drain_timeout_action: DrainTimeoutAction = "fail"
    load_timeout_seconds: float = field(default=120.0, metadata=_meta(min=0.001))
    unload_timeout_seconds: float = field(default=30.0, metadata=_meta(min=0.001))
    settle_timeout_seconds: float = field(default=10.0, metadata=_meta(min=0))
    settle_tolerance_mib: int = field(default=64, metadata=_meta(min=0))
    # a CPU-only llama-server (no device memory to settle): the leaving model's process
    # exits while the next one loads; false waits for it (two models' RAM at once)
    background_exit: bool = True
    gpu_probe: GpuProbeKind = "auto"
    queue_timeout_seconds: float = field(default=60.0, metadata=_meta(min=0))
    replay_timeout_seconds: float = field(default=600.0, metadata=_meta(min=0.001))
    cancel_grace_seconds: float = field(default=5.0, metadata=_meta(min=0))
    switch_timeout_seconds: float = field(default=900.0, metadata=_meta(min=0.001))
    history: int = field(default=50, metadata=_meta(min=1))
    kv_snapshots: bool = False
    kv_snapshot_max_bytes: int = field(default=4 * 1024**3, metadata=_meta(min=0))
    # policy "auto": overlap only when the GPU's free memory covers the target's
    # estimate (GGUF size + KV cache) plus this margin
    auto_margin_mib: int = field(default=512, metadata=_meta(min=0))


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """``[session]``: bounds on the context kept and replayed per session."""

    max_session_messages: int = field(default=64, metadata=_meta(min=1))
    max_prompt_chars: int = field(default=32000, metadata=_meta(min=1))
    max_prompt_tokens: int = field(default=0, metadata=_meta(min=0))
    token_count_mode: TokenCountMode = "auto"
    trim_low_water: float = field(default=0.6, metadata=_meta(min=0, max=1))
    default_system_prompt: str = ""
    queue_timeout_seconds: float = field(default=600.0, metadata=_meta(min=0))
    store_file: Path | None = None
    # bounds on what the store keeps: sessions per API key (one owner when keys are off),
    # messages stored per session (0 = no bound), and days a session is kept unused (0 = ever)
    max_sessions_per_key: int = field(default=1000, metadata=_meta(min=0))
    max_stored_messages: int = field(default=10000, metadata=_meta(min=0))
    retention_days: float = field(default=0.0, metadata=_meta(min=0))


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``[store]``: where sessions and stored Responses live. ``url = ""`` (the default):
    the SQLite file ``[session] store_file``; ``postgresql://...``: a PostgreSQL that
    several hotmodel nodes share (sessions/postgres.py)."""

    url: str = ""
    # connections each node keeps open for the store's queries; a turn's session lock
    # holds one more of its own for the turn (at most lock_pool_size at once)
    pool_size: int = field(default=10, metadata=_meta(min=1, max=1000))
    lock_pool_size: int = field(default=64, metadata=_meta(min=1, max=10000))

    @property
    def shown(self) -> str:
        """The URL without its password (for logs and /admin/status)."""
        return redact_url(self.url)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


STORE_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``[cluster]``: this node's part in a cluster of hotmodels sharing ``[store] url``."""

    node_id: str = ""  # "" = host:port ([server]'s, after serve --port)
    url: str = ""  # how the other nodes reach this one; "" = http://host:port
    key: str = ""  # the cluster key, the same on every node: how nodes trust each other
    heartbeat_seconds: float = field(default=2.0, metadata=_meta(min=0.1, max=60))
    dead_after_seconds: float = field(default=10.0, metadata=_meta(min=0.5, max=3600))


MIN_CLUSTER_KEY = 16


@dataclass(frozen=True, slots=True)
class SystemPrompt:
    """``[system_prompts.NAME]``: a named system prompt, sent first on every request of a
    session that uses it. (A *preset* is a model: a section of llama-server's INI.)"""

    system: str


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration."""

    path: Path
    server: ServerConfig
    router: RouterConfig
    switch: SwitchConfig
    session: SessionConfig
    presets: Presets
    system_prompts: Mapping[str, SystemPrompt] = field(default_factory=dict)
    store: StoreConfig = field(default_factory=StoreConfig)
    keys: KeySet = field(default_factory=KeySet)
    cluster: ClusterConfig | None = None  # None: no [cluster] section, a node of its own
    # [server] keys given on the command line (serve --port ...): they win over the
    # file at start and at every reload
    server_overrides: Mapping[str, Any] = field(default_factory=dict)

    def with_server_overrides(self, **changes: Any) -> Config:
        """This config with ``changes`` applied over ``[server]``, and remembered."""
        if not changes:
            return self
        return dataclasses.replace(
            self,
            server=dataclasses.replace(self.server, **changes),
            server_overrides={**self.server_overrides, **changes},
        )

    @property
    def router_log_file(self) -> Path:
        return self.router.log_file or self.server.state_dir / "llama-server.log"

    @property
    def kv_dir(self) -> Path:
        """Where llama-server writes slot snapshots (``--slot-save-path``)."""
        return self.server.state_dir / "kv"

    @property
    def session_store_file(self) -> Path:
        return self.session.store_file or self.server.state_dir / "sessions.sqlite3"


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
    _check_sections(raw, path)
    server = _build(ServerConfig, raw.get("server", {}), path, "server", base)
    router = _build(RouterConfig, raw["router"], path, "router", base)
    switch = _build(SwitchConfig, _aliased(raw, "switch", path), path, "switch", base)
    session = _build(SessionConfig, raw.get("session", {}), path, "session", base)
    store = _build(StoreConfig, raw.get("store", {}), path, "store", base)
    if store.url and not store.url.startswith(STORE_SCHEMES):
        raise ConfigError(
            path,
            f'expected "" (the SQLite file) or a postgresql:// URL, got {store.shown!r}',
            section="store",
            key="url",
        )
    prompts = _system_prompts(raw.get("system_prompts", {}), session, path, base)
    security = raw.get("security", {})
    for key in security:
        if key not in KNOWN_KEYS:
            raise ConfigError(
                path,
                f"unknown key (known keys: {', '.join(sorted(KNOWN_KEYS))})",
                section="security",
                key=key,
            )
    keys = load_keys(security, path)
    parallel_args = {"-np", "--parallel"}
    if parallel_args & {a.split("=", 1)[0] for a in router.extra_args}:
        raise ConfigError(
            path,
            "set the slot count with [router] parallel, not in extra_args (hotmodel pins "
            "each API key to a slot and needs to know how many there are)",
            section="router",
            key="extra_args",
        )
    if switch.kv_snapshots and router.parallel != 1:
        raise ConfigError(
            path,
            "kv_snapshots needs [router] parallel = 1 (only then is it known which slot "
            "holds a session)",
            section="switch",
            key="kv_snapshots",
        )
    if switch.policy == "overlap" and router.models_max < 2:
        raise ConfigError(
            path,
            "the overlap policy needs [router] models_max >= 2",
            section="switch",
            key="policy",
        )
    presets = load_presets(router.models_preset)
    if switch.kv_snapshots or keys.enabled:
        # snapshots need one slot per model; keys need to know the slots (each key is
        # pinned to one, sessions/tenants.py)
        why = "[switch] kv_snapshots (one slot per model)" if switch.kv_snapshots else "API keys"
        for section, options in [("*", presets.globals)] + [
            (m.name, m.options) for m in presets.models.values()
        ]:
            if {"parallel", "np"} & set(options):
                raise ConfigError(
                    presets.path,
                    f"a slot count per preset breaks {why}; use [router] parallel",
                    section=section,
                    key="parallel",
                )
    if router.default_model not in presets.models:
        names = ", ".join(presets.models) or "none"
        raise ConfigError(
            path,
            f"{router.default_model!r} is not a preset in "
            f"{router.models_preset} (presets: {names})",
            section="router",
            key="default_model",
        )
    if presets.models[router.default_model].resident:
        raise ConfigError(
            path,
            f"{router.default_model!r} is resident (resident = true in "
            f"{router.models_preset}): a resident stays loaded beside the switched model "
            "and cannot be the default (switched) model",
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
        system_prompts=prompts,
        keys=keys,
        store=store,
        cluster=_cluster(raw, store, path, base),
    )


def _cluster(
    raw: Mapping[str, Any], store: StoreConfig, path: Path, base: Path
) -> ClusterConfig | None:
    """``[cluster]`` with its defaults filled in, or None without the section."""
    if "cluster" not in raw:
        return None
    cluster = _build(ClusterConfig, raw["cluster"], path, "cluster", base)
    if not store.url.startswith(STORE_SCHEMES):
        raise ConfigError(
            path,
            "a cluster shares its sessions in PostgreSQL: set [store] url = "
            '"postgresql://..." (the same on every node)',
            section="cluster",
        )
    if len(cluster.key) < MIN_CLUSTER_KEY:
        raise ConfigError(
            path,
            f"the cluster key must be at least {MIN_CLUSTER_KEY} characters, the same on "
            "every node (e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')",
            section="cluster",
            key="key",
        )
    return cluster


def _check_sections(raw: Mapping[str, Any], path: Path) -> None:
    """Every section known and a table, ``[router]`` present; renamed keys say their new name."""
    known = {"server", "router", "switch", "session", "store", "system_prompts", "security"}
    known |= {"cluster"}
    for name, value in raw.items():
        if name == "presets":
            raise ConfigError(
                path,
                "[presets.NAME] tables are now [system_prompts.NAME] ('preset' means a model "
                "section of the INI file)",
                section=name,
            )
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
    if "default_preset" in raw.get("session", {}):
        raise ConfigError(
            path, "renamed: use default_system_prompt", section="session", key="default_preset"
        )


def _aliased(raw: Mapping[str, Any], section: str, path: Path) -> Mapping[str, Any]:
    """``section``'s table with each old key (``ALIASES``) under its new name; both
    together are an error."""
    table: Mapping[str, Any] = raw.get(section, {})
    renamed = {old: new for old, new in ALIASES.get(section, {}).items() if old in table}
    for old, new in renamed.items():
        if new in table:
            raise ConfigError(
                path,
                f"renamed to {new}, which is set too: keep only {new}",
                section=section,
                key=old,
            )
    return {renamed.get(key, key): value for key, value in table.items()}


def _system_prompts(
    tables: Mapping[str, Any], session: SessionConfig, path: Path, base: Path
) -> dict[str, SystemPrompt]:
    prompts = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(
                path, "must be a table with a 'system' key", section=f"system_prompts.{name}"
            )
        prompts[name] = _build(SystemPrompt, table, path, f"system_prompts.{name}", base)
    default = session.default_system_prompt
    if default and default not in prompts:
        raise ConfigError(
            path,
            f"{default!r} is not defined as [system_prompts.{default}]",
            section="session",
            key="default_system_prompt",
        )
    return prompts


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
                values[name] = resolve_path(base, f.default)
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
        return resolve_path(base, Path(value))
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail("a list of strings")
        return tuple(value)
    raise TypeError(f"unsupported config type {hint!r}")  # a bug in this module, not in a config
