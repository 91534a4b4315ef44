"""Pure decisions of the control loop: which steps take the router from one model to another.

No I/O, no state: :func:`plan` is tested on its own, and the engine executes
what it returns.
"""

from __future__ import annotations

import enum
from typing import Literal

# what a switch does; [switch] policy "auto" picks one of them per switch (control/fit.py)
Policy = Literal["zero_overlap", "overlap"]


class Step(enum.Enum):
    CHECK = "check"
    RESTART = "restart"
    DRAIN = "drain"
    SAVE = "save"  # the leaving model's KV snapshot
    UNLOAD = "unload"
    SETTLE = "settle"
    LOAD = "load"
    RESTORE = "restore"  # the arriving model's KV snapshot
    REPLAY = "replay"
    ACTIVATE = "activate"


def plan(
    policy: Policy,
    current: str | None,
    target: str | None,
    kv: bool = False,
    restart: bool = False,
) -> tuple[Step, ...]:
    """The steps that take the router from ``current`` to ``target`` (None: no model).

    zero_overlap activates the target before the replay: held requests are
    admitted as soon as the target is loaded (they may then wait behind the
    replay inside llama-server, which is cheaper than a retry). overlap
    replays before it activates, since the old model serves meanwhile. With
    ``kv`` (KV snapshots), the leaving model's slot is saved after its drain
    and the arriving model's snapshot restored before anyone can use it.
    With ``restart`` (the router must read a reloaded preset list), the router
    is restarted at the first moment no model is loaded: after the unload (or
    first, when none is); overlap never has such a moment, so it waits.
    """
    steps = _plan(policy, current, target)
    if not kv:
        steps = tuple(s for s in steps if s not in (Step.SAVE, Step.RESTORE))
    if restart and (current is None or Step.SETTLE in steps):
        at = steps.index(Step.SETTLE) + 1 if Step.SETTLE in steps else 0
        if steps[:1] == (Step.CHECK,):
            at = max(at, 1)  # a missing target file changes nothing, the router included
        steps = (*steps[:at], Step.RESTART, *steps[at:])
    return steps


def _plan(policy: Policy, current: str | None, target: str | None) -> tuple[Step, ...]:
    if target is None:  # unload: nothing is loaded afterwards
        if current is None:
            return ()
        return (Step.DRAIN, Step.SAVE, Step.UNLOAD, Step.SETTLE, Step.ACTIVATE)
    # CHECK first: what can be known before the running model is touched (its file)
    if current is None:
        return (Step.CHECK, Step.LOAD, Step.RESTORE, Step.ACTIVATE, Step.REPLAY)
    if policy == "overlap":
        return (
            Step.CHECK,
            Step.LOAD,
            Step.RESTORE,
            Step.REPLAY,
            Step.ACTIVATE,
            Step.DRAIN,
            Step.SAVE,
            Step.UNLOAD,
        )
    return (
        Step.CHECK,
        Step.DRAIN,
        Step.SAVE,
        Step.UNLOAD,
        Step.SETTLE,
        Step.LOAD,
        Step.RESTORE,
        Step.ACTIVATE,
        Step.REPLAY,
    )


def beside_load(
    steps: tuple[Step, ...], exits_in_background: bool, same_model: bool = False
) -> tuple[Step, ...]:
    """The steps of ``steps`` that run while the target loads instead of before it.

    When the leaving model's process exits in the background (a CPU-only
    llama-server: no device memory to wait for), the load does not need it gone:
    its KV snapshot is saved, and it is unloaded, while the next model loads (the
    router has a spare place for it). Without a snapshot to save there is nothing
    to gain (the unload is one request); a router restart needs no model loaded;
    and a model loaded again (a reload) must be gone before it loads.
    """
    if not exits_in_background or same_model or Step.RESTART in steps:
        return ()
    if Step.SAVE not in steps or Step.LOAD not in steps:
        return ()
    start, load = steps.index(Step.SAVE), steps.index(Step.LOAD)
    return steps[start:load]


def plan_recovery(kv: bool = False) -> tuple[Step, ...]:
    """After the router or the model's child died: nothing is resident any more, so
    start the router if it is down, load the model again, let requests in, replay."""
    steps = (Step.RESTART, Step.LOAD, Step.RESTORE, Step.ACTIVATE, Step.REPLAY)
    return steps if kv else tuple(s for s in steps if s is not Step.RESTORE)
