"""Reload without restart: re-read the TOML and the INI, apply what can change live.

:func:`plan_reload` is pure: it compares the running configuration with a
freshly parsed one and decides, key by key, what is applied at once and what
needs a restart. :func:`reload_config` does it: the new files are parsed and
validated first (a bad file changes nothing and says why), the live settings
are swapped in one step (no await in between, so no request sees half of
them), and the model set changes only through the control loop: the active
model is loaded again only when its own preset changed (if that switch fails,
the previous configuration is put back whole, and the model loaded again with
it in the same command); other presets reach
the router at the next moment no model is loaded (llama-server reads its
preset list once, at start, so the router restarts then, at almost no cost).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hotmodel.config import Config, load_config
from hotmodel.control.controller import Controller
from hotmodel.control.report import SwitchReport
from hotmodel.control.residents import residents_to_load
from hotmodel.control.watchdog import Watchdog
from hotmodel.errors import ConfigError
from hotmodel.presets import check_model_file
from hotmodel.router.options import check_preset_keys, known_options
from hotmodel.sessions.service import SessionService

log = logging.getLogger("hotmodel.reload")


class _Binary(Protocol):
    @property
    def binary(self) -> Path: ...


class Reloadable(Protocol):
    """What a reload reads and swaps: ``runtime.Services`` is one. Declared here, so
    that control/ needs nothing from the runtime above it (no arrow up)."""

    config: Config  # swapped whole by a reload

    @property
    def reload_lock(self) -> asyncio.Lock: ...

    @property
    def supervisor(self) -> _Binary: ...

    @property
    def controller(self) -> Controller: ...

    @property
    def sessions(self) -> SessionService: ...

    @property
    def watchdog(self) -> Watchdog: ...


# Per section, the keys whose change needs a restart (they shape a process, a socket,
# a file or an object built once at start); every other key is applied at once.
# [server] and [router] are mostly process settings: there the live keys are listed.
_LIVE = {
    "server": frozenset(
        {
            "log_level",
            "switch_drain_timeout_seconds",
            "max_body_bytes",
            "max_messages",
            "default_max_tokens",
            "allowed_hosts",
            "allowed_origins",
        }
    ),
    "router": frozenset({"idle_unload_seconds", "watchdog_interval_seconds", "watchdog_failures"}),
}
_RESTART = {
    "switch": frozenset({"kv_snapshots", "gpu_probe", "history"}),
    "session": frozenset({"store_file"}),
    "store": frozenset({"url", "pool_size", "lock_pool_size"}),  # the store opens once
}


def _is_live(section: str, key: str) -> bool:
    if section in _LIVE:
        return key in _LIVE[section]
    return key not in _RESTART[section]


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload changes: the effective config, and what each changed key becomes."""

    config: Config  # the running config with every live change applied
    applied: tuple[str, ...]  # "section.key" now in effect
    restart_needed: tuple[str, ...]  # changed, but in effect only after a restart
    presets_changed: tuple[str, ...]  # presets added, removed or edited
    reload_active: bool  # the active model's own preset changed: load it again

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.restart_needed or self.presets_changed)

    def to_json(self) -> dict[str, Any]:
        return {
            "changed": self.changed,
            "applied": list(self.applied),
            "restart_needed": list(self.restart_needed),
            "presets_changed": list(self.presets_changed),
            "reload_active": self.reload_active,
        }


def _section(old: Any, new: Any, name: str) -> tuple[Any, list[str], list[str]]:
    """The section with its live keys taken from ``new``; (merged, applied, restart)."""
    applied: list[str] = []
    restart: list[str] = []
    updates: dict[str, Any] = {}
    for f in dataclasses.fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        if _is_live(name, f.name):
            applied.append(f"{name}.{f.name}")
            updates[f.name] = after
        else:
            restart.append(f"{name}.{f.name}")
    return dataclasses.replace(old, **updates), applied, restart


def plan_reload(old: Config, new: Config, active: str | None) -> ReloadPlan:
    """Compare the running ``old`` with ``new``; raise ConfigError for a change that
    cannot be applied to the running model set (the active preset removed), or that
    would lock every ``/admin`` route (client keys and no admin key) until a restart."""
    if new.keys.client and not new.keys.admin:
        raise ConfigError(
            new.path,
            "client keys without an admin key would lock /admin (this reload included) "
            "until a restart; add admin_keys (or admin_keys_file, HOTMODEL_ADMIN_KEYS)",
            section="security",
            key="admin_keys",
        )
    if active is not None and active not in new.presets.models:
        raise ConfigError(
            new.presets.path,
            "is the active model and cannot be removed by a reload; switch to another model first",
            section=active,
        )
    if active is not None and new.presets.models[active].resident:
        raise ConfigError(
            new.presets.path,
            "is the active model and cannot become resident; switch to another model first",
            section=active,
            key="resident",
        )
    applied: list[str] = []
    restart: list[str] = []
    sections: dict[str, Any] = {}
    for name in ("server", "router", "switch", "session", "store"):
        merged, a, r = _section(getattr(old, name), getattr(new, name), name)
        sections[name] = merged
        applied += a
        restart += r
    if old.system_prompts != new.system_prompts:
        applied.append("system_prompts")
    if old.keys != new.keys:
        applied.append("security.keys")  # the names only: never the keys
    if old.keys.enabled != new.keys.enabled:
        restart.append("router.cache_ram")  # llama-server's prompt cache in RAM (tenants.py)
    before, after = old.presets.models, new.presets.models
    presets_changed = sorted(
        name for name in set(before) | set(after) if before.get(name) != after.get(name)
    )
    if (old.presets.globals, old.presets.top) != (new.presets.globals, new.presets.top):
        presets_changed = sorted({*presets_changed, *after})  # [*] applies to every preset
    merged = dataclasses.replace(
        old,
        system_prompts=new.system_prompts,
        keys=new.keys,
        presets=new.presets,
        **sections,
    )
    return ReloadPlan(
        config=merged,
        applied=tuple(applied),
        restart_needed=tuple(restart),
        presets_changed=tuple(presets_changed),
        reload_active=active is not None and active in presets_changed,
    )


async def reload_config(services: Reloadable) -> dict[str, Any]:
    """Re-read the config files and apply them; the answer of ``POST /admin/reload``.

    Raises :class:`ConfigError` (nothing changed) when a file is invalid. One reload
    at a time (``POST /admin/reload`` and SIGHUP may race): a revert must put back the
    configuration its own reload replaced.
    """
    async with services.reload_lock:
        return await _reload(services)


async def _reload(services: Reloadable) -> dict[str, Any]:
    old = services.config
    new = await asyncio.to_thread(load_config, old.path)
    new = new.with_server_overrides(**old.server_overrides)  # serve's flags still win
    known = await asyncio.to_thread(known_options, services.supervisor.binary)
    check_preset_keys(new.presets, known)  # else the router could not start on them
    controller = services.controller
    plan = plan_reload(old, new, controller.active)
    await services.sessions.check_dropped_prompts(new)  # stored sessions still use it
    if plan.reload_active and controller.active is not None:
        # it is loaded again at once: a file that cannot be loaded is refused now
        check_model_file(new.presets, controller.active)
    parked = controller.parked
    if parked is not None and parked in plan.presets_changed:
        check_model_file(new.presets, parked)  # the next request loads it
    check_new_model_files(old, new)
    # a resident added or edited: the router must read the new presets, so the active
    # model is loaded again (the router restarts meanwhile, the residents come back after)
    reload_active = plan.reload_active or bool(residents_to_load(old.presets, new.presets))
    _apply(services, plan.config)
    result = plan.to_json()
    reload = controller.active if reload_active else None
    # the engine takes its part between two runs; if the active model's load again
    # fails, the previous configuration comes back within the same command
    report = await controller.reconfigure(
        plan.config, old, reload, revert=lambda: _apply(services, old)
    )
    if report is not None:
        result["switch"] = report.to_json()
        if report.failed:
            result["reverted"] = _reverted(report)
            log.warning("config reload reverted: %s", report.error)
            return result
    elif plan.presets_changed:
        result["note"] = (
            "the router reads the new presets at the next switch or unload "
            "(llama-server reads its preset list at start)"
        )
    if old.presets.residents or new.presets.residents:  # synced by the Reconfigure command
        result["residents"] = controller.residents.status()
    log.info(
        "config reloaded: applied %s; needs a restart: %s; presets changed: %s",
        ", ".join(plan.applied) or "-",
        ", ".join(plan.restart_needed) or "-",
        ", ".join(plan.presets_changed) or "-",
    )
    return result


def check_new_model_files(old: Config, new: Config) -> None:
    """Refuse (ConfigError naming the file, section and key: nothing changes) a model
    file that cannot be loaded in a preset this reload adds or edits, and a new
    ``default_model``'s: ``hotmodel serve`` refuses the default model's (exit 3), and a
    preset just written with a wrong path is better said now than at its first switch."""
    before, after = old.presets.models, new.presets.models
    for name, preset in after.items():
        if before.get(name) != preset:
            check_model_file(new.presets, name)
    default = new.router.default_model
    if default != old.router.default_model and default in after:
        check_model_file(new.presets, default)


def _reverted(report: SwitchReport) -> dict[str, Any]:
    """What the answer says of a reload whose switch failed: its configuration was
    taken back, and the switch back to the previous one (or why there was none)."""
    if report.reverted is not None:
        return {"switch": report.reverted.to_json()}
    return {"note": "nothing was changed: the previous configuration stays in force"}


def _apply(services: Reloadable, config: Config) -> None:
    """Swap the live settings outside the control loop in, all at once (no await: no
    request sees half of them); the loop's own (the engine's settings, the router's
    presets, the snapshots') change through its ``Reconfigure`` command."""
    services.config = config
    services.sessions.config = config
    services.watchdog.config = config
    logging.getLogger().setLevel(config.server.log_level.upper())
