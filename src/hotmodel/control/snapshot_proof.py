"""The proof of a KV snapshot's restore: the ``cache_n`` of a request that can tell.

A restore is only known to have taken when the first request on the model
after it (the restored session's next turn, or the replay right after the
restore) reads only what was added since: its ``timings.cache_n`` covers what
was restored. Only a request that can tell proves it (:func:`unprovable` says
why another cannot); anything else leaves the verdict unknown, never a false
"did not take", which would delete the snapshot and stop saving that model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hotmodel.control.snapshot_folder import Meta, SnapshotFolder
from hotmodel.sessions.context import Message
from hotmodel.sessions.slots import Covered, SlotLedger, messages_hash

log = logging.getLogger("hotmodel.control")

NO_TAKE = (
    "not saved: a restore of this model did not take in this llama-server "
    "(sliding-window attention keeps too little of the prompt; --swa-full keeps it)"
)


@dataclass(slots=True)
class Unproved:
    """A restore whose ``cache_n`` has not been seen yet."""

    meta: Meta  # whose session it holds, too
    info: dict[str, Any]  # the switch report's restore entry: the verdict is written in it
    gen: int  # the slot ledger's generation of the restore: the next request's is gen + 1
    covered: Covered | None  # the slot's label the restore wrote (the same object: untouched)


@dataclass(frozen=True, slots=True)
class Turn:
    """A chat request on a model that ended with an answer: the proof of a restore, or not."""

    model: str
    gen: int  # the slot ledger's generation of the request
    session: tuple[str, str] | None  # (owner, id); None: no session's request
    sent: Sequence[Message] | None  # the messages sent (a session's turn)
    cached: int  # prompt tokens llama-server took from its cache (timings.cache_n)
    cache_prompt: bool = True  # False: the client told llama-server not to use its cache


def unprovable(pending: Unproved, turn: Turn, latest: int) -> str | None:
    """Why ``turn`` cannot tell whether ``pending`` took (None: its cache_n can)."""
    if turn.session != (pending.meta.owner, pending.meta.session_id):
        return "the first request after it was not this session's"
    if turn.gen != pending.gen + 1 or latest != turn.gen:
        return "another request used the model's slot around this session's next turn"
    if not turn.cache_prompt:
        return "the next turn told llama-server not to use its cache (cache_prompt: false)"
    n, sent = pending.meta.n_messages, turn.sent or ()
    if len(sent) < n or messages_hash(sent[:n]) != pending.meta.messages_hash:
        return "the next turn's prompt no longer begins with what it holds (trimmed, or edited)"
    return None


class Proofs:
    """Per model, the restore the first request after it proves (or not), and the
    models whose restores do not take in this llama-server."""

    def __init__(self, folder: SnapshotFolder, ledger: SlotLedger) -> None:
        self.folder = folder
        self.ledger = ledger
        self.unproved: dict[str, Unproved] = {}
        # models whose restores do not take in this llama-server (Gemma 3's sliding-window
        # attention keeps too little: it re-reads the prompt): not saved again this run
        self.no_take: set[str] = set()

    def turn_ended(self, turn: Turn) -> None:
        """A chat request ended with an answer. The first one after a restore proves it
        when it is the restored session's next turn, nothing ran beside it on the slot,
        and its prompt still begins with what the snapshot holds; otherwise the verdict
        stays unknown (``unchecked`` says why), never a false "did not take"."""
        pending = self.unproved.pop(turn.model, None)
        if pending is None:
            return
        why = unprovable(pending, turn, self.ledger.latest(turn.model))
        if why is not None:
            pending.info["unchecked"] = why
            return
        self._verdict(turn.model, pending, turn.cached)

    def proved(self, model: str, cached: int, session_id: str | None) -> bool | None:
        """The replay right after the restore (the overlap policy: before the model
        serves) prefilled ``session_id``'s conversation and found ``cached`` prompt
        tokens in the cache: whether the restore took (None: none waits, or that replay
        was another session's and cannot tell)."""
        pending = self.unproved.pop(model, None)
        if pending is None:
            return None
        if session_id != pending.meta.session_id:
            pending.info["unchecked"] = "the replay after it was another session's"
            return None
        return self._verdict(model, pending, cached)

    def _verdict(self, model: str, pending: Unproved, cached: int) -> bool:
        """Whether ``pending`` took, from the ``cache_n`` of a request that can tell.

        A restore that did not take (a known upstream bug class: success reported, cache
        empty; here, Gemma 3's sliding window) is of no use, and neither would the model's
        next snapshot be (same binary, same settings): it is deleted, and the model is not
        saved again until hotmodel restarts. The request that found out read the whole
        conversation itself: that is the replay this falls back to.
        """
        restored = int(pending.info.get("tokens") or 0)
        took = cached >= restored // 2
        pending.info["took"], pending.info["cache_tokens"] = took, cached
        if not took:
            why = f"its restore did not take (cache_n {cached} of {restored} restored tokens)"
            pending.info["reason"] = why
            log.warning("KV snapshot of %s for session %r: %s", model, pending.meta.session_id, why)
            self.folder.delete(pending.meta, why)
            self.no_take.add(model)
        return took
