"""Pure decisions of the control loop: which steps take the router from one model to another.

No I/O, no state: :func:`plan` is tested on its own, and the engine executes
what it returns.
"""

from __future__ import annotations

import enum

from hotmodel.config import SwitchPolicy


class Step(enum.Enum):
    CHECK = "check"
    RESTART = "restart"
    DRAIN = "drain"
    UNLOAD = "unload"
    SETTLE = "settle"
    LOAD = "load"
    REPLAY = "replay"
    ACTIVATE = "activate"


def plan(policy: SwitchPolicy, current: str | None, target: str | None) -> tuple[Step, ...]:
    """The steps that take the router from ``current`` to ``target`` (None: no model).

    zero_overlap activates the target before the replay: held requests are
    admitted as soon as the target is loaded (they may then wait behind the
    replay inside llama-server, which is cheaper than a retry). overlap
    replays before it activates, since the old model serves meanwhile.
    """
    if target is None:  # unload: nothing is loaded afterwards
        return () if current is None else (Step.DRAIN, Step.UNLOAD, Step.SETTLE, Step.ACTIVATE)
    # CHECK first: what can be known before the running model is touched (its file)
    if current is None:
        return (Step.CHECK, Step.LOAD, Step.ACTIVATE, Step.REPLAY)
    if policy == "overlap":
        return (Step.CHECK, Step.LOAD, Step.REPLAY, Step.ACTIVATE, Step.DRAIN, Step.UNLOAD)
    return (
        Step.CHECK,
        Step.DRAIN,
        Step.UNLOAD,
        Step.SETTLE,
        Step.LOAD,
        Step.ACTIVATE,
        Step.REPLAY,
    )


def plan_recovery() -> tuple[Step, ...]:
    """After the router or the model's child died: nothing is resident any more, so
    start the router if it is down, load the model again, let requests in, replay."""
    return (Step.RESTART, Step.LOAD, Step.ACTIVATE, Step.REPLAY)
