"""Sessions: the conversation belongs to hotmodel, not to the loaded model.

:class:`SessionService` checks a request's session fields, prepares the prompt
(stored history + new turns + the session's system prompt, bounded), records
the turns once the answer is complete, and replays the most recently used
session into a freshly loaded model so the next turn hits its prompt cache.
Nothing is written before an answer is complete: a refused or failed request
leaves the store as it was. The store's bounds (``[session]
max_sessions_per_key``, ``max_stored_messages``) are checked before anything
is sent to llama-server, and again when the turn is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from hotmodel.config import Config
from hotmodel.errors import (
    ConfigError,
    InvalidRequestError,
    SessionBusyError,
    SessionFullError,
    SessionLimitError,
)
from hotmodel.router.client import RouterClient
from hotmodel.sessions.context import (
    Message,
    Prompt,
    bound_messages_and_chars,
    bound_tokens,
    build_prompt,
    continues,
    reconcile,
    without_empty_prefill,
)
from hotmodel.sessions.locks import SessionLocks, busy
from hotmodel.sessions.slots import SlotLedger
from hotmodel.sessions.store import CHAIN_PREFIX, Limits, Session, SessionStore, is_chain
from hotmodel.sessions.tenants import SlotTenants

log = logging.getLogger("hotmodel.sessions")

MAX_SESSION_ID = 128
SESSION_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_SESSION_ID}}}")
REPLAY_SETTING = "[switch] replay_timeout_seconds"


@dataclass(frozen=True, slots=True)
class SessionRef:
    """A request's validated session fields: the id, and the system prompt it names (if any),
    and the owner (the API key's fingerprint; '') whose namespace the id is in."""

    id: str
    system_prompt: str | None
    owner: str = ""

    @property
    def lock_key(self) -> str:
        return f"{self.owner}\0{self.id}"


@dataclass
class Prepared:
    """A session request on its way: what to send, and what to store once answered."""

    owner: str
    session_id: str
    system_prompt: str
    turns: list[Message]
    prompt: Prompt
    stored_end: int  # the seq after the last stored message the prompt holds
    rewind: int | None = None  # stored messages from this seq on are replaced by ``turns``
    slot_gen: int = 0  # the slot ledger's generation of the request that carries it


class ForgetsSessions(Protocol):
    """What keeps files for a session (the KV snapshots): told when it is deleted."""

    def forget_session(self, owner: str, session_id: str) -> int: ...


class SessionService:
    def __init__(self, config: Config, store: SessionStore, router: RouterClient) -> None:
        self.config = config
        self.store = store
        self.router = router
        self.locks = SessionLocks()
        self.slots = SlotLedger()
        self.tenants = SlotTenants(config.router.parallel)  # whose prompt each slot holds
        self.token_calls = 0  # tokenizer round trips made so far (for tests and metrics)

    @contextlib.asynccontextmanager
    async def hold(self, ref: SessionRef, timeout: float) -> AsyncIterator[None]:
        """Hold ``ref``'s session for a turn: its lock in this process, then (a store
        shared by several nodes) the store's turn lock, within ``timeout`` seconds in
        all; SessionBusyError (409) after the wait."""
        started = time.monotonic()
        async with self.locks.hold(ref.lock_key, timeout):
            left = max(0.0, timeout - (time.monotonic() - started))
            async with contextlib.AsyncExitStack() as stack:
                try:
                    await stack.enter_async_context(self.store.turn_lock(ref.owner, ref.id, left))
                except SessionBusyError:
                    raise busy(ref.id, timeout) from None  # the whole wait, as the setting
                yield

    def check(self, session_id: object, system_prompt: object, owner: str = "") -> SessionRef:
        """Validate the session fields of a request (400 naming the field)."""
        if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
            raise InvalidRequestError(
                f"session id must be 1 to {MAX_SESSION_ID} visible ASCII characters "
                "(no spaces or control characters: it travels in a header)",
                param="session_id",
            )
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise InvalidRequestError("'system_prompt' must be a string", param="system_prompt")
        if system_prompt and system_prompt not in self.config.system_prompts:
            known = ", ".join(self.config.system_prompts) or "none defined"
            raise InvalidRequestError(
                f"system prompt {system_prompt!r} is not defined (system prompts: {known})",
                param="system_prompt",
            )
        return SessionRef(session_id, system_prompt, owner)

    def check_stored(self, session_id: str) -> None:
        """Validate an id a stored session may have (400): a client's, or a Responses
        chain's (``responses resp_...``, which lists show)."""
        if is_chain(session_id) and SESSION_ID.fullmatch(session_id[len(CHAIN_PREFIX) :]):
            return
        self.check(session_id, None)

    def _system(self, name: str) -> str | None:
        # A stored name may be gone from an edited config: the session then goes on without.
        prompt = self.config.system_prompts.get(name)
        return None if prompt is None else prompt.system

    def _window(self, incoming: int) -> int:
        """How many stored messages a turn reads: what can be sent (the message bound and
        a trimming step or two), or what the client resent to be matched, if more."""
        cfg = self.config.session
        return cfg.max_session_messages + 2 * self._step() + incoming + 1

    def _step(self) -> int:
        # Past a bound, cut back to the low-water mark: the cut then moves in steps and
        # the prompt's beginning (llama-server's cache) stays the same between them.
        cfg = self.config.session
        return max(
            1, cfg.max_session_messages - math.floor(cfg.max_session_messages * cfg.trim_low_water)
        )

    async def prepare(
        self, ref: SessionRef, request_messages: list[Message], model: str
    ) -> Prepared:
        request_messages = without_empty_prefill(request_messages)
        session = await self.store.get(ref.owner, ref.id, self._window(len(request_messages)))
        stored = [] if session is None else [m.message for m in session.messages]
        if ref.system_prompt is not None:
            system_prompt = ref.system_prompt
        elif session is not None:
            system_prompt = session.system_prompt
        else:
            system_prompt = self.config.session.default_system_prompt
        met = reconcile(stored, request_messages, session is None or session.offset == 0)
        kept = stored if met.keep is None else stored[: met.keep]
        offset = 0 if session is None else session.offset
        await self._check_room(ref, session, offset + len(kept) + _adds(met.turns, kept))
        prompt = build_prompt(self._system(system_prompt), request_messages, kept, met.turns)
        prompt.base = offset
        await self._bound(prompt, model)
        rewind = None if met.keep is None else offset + met.keep
        return Prepared(
            ref.owner,
            ref.id,
            system_prompt,
            met.turns,
            prompt,
            stored_end=offset + len(kept),
            rewind=rewind,
        )

    def limits(self) -> Limits:
        cfg = self.config.session
        return Limits(cfg.max_sessions_per_key, cfg.max_stored_messages)

    async def _check_room(self, ref: SessionRef, session: Session | None, total: int) -> None:
        """Refuse a turn past the store's bounds (409) before anything is sent: a new
        session past the owner's count, or a session that would hold ``total`` messages."""
        limits = self.limits()
        new = session is None and limits.sessions
        if new and await self.store.owned(ref.owner) >= limits.sessions:
            raise SessionLimitError.reached(limits.sessions)
        if limits.messages and total > limits.messages:
            raise SessionFullError.over(ref.id, total, limits.messages)

    async def _bound(self, prompt: Prompt, model: str) -> None:
        cfg = self.config.session
        prompt.step = self._step()
        bound_messages_and_chars(prompt, cfg.max_session_messages, cfg.max_prompt_chars)

        async def count(messages: list[Message]) -> int:
            self.token_calls += 1
            return await self.router.count_tokens(model, messages)

        await bound_tokens(prompt, cfg.max_prompt_tokens, cfg.token_count_mode, count)

    async def complete(self, prepared: Prepared, reply: Message, model: str) -> None:
        """Store the request's new turns and the answer, in one transaction."""
        turns, rewind, sent = prepared.turns, prepared.rewind, prepared.prompt.messages()
        if sent and continues(sent[-1], reply):
            # the answer holds the trailing assistant message whole: it replaces that
            # message (a new turn, or the stored answer resent) instead of following it
            sent = sent[:-1]
            if turns:
                turns = turns[:-1]
            else:
                rewind = prepared.stored_end - 1
        await self.store.append(
            prepared.owner,
            prepared.session_id,
            [*turns, reply],
            model,
            prepared.system_prompt,
            rewind=rewind,
            limits=self.limits(),
        )
        owner, session_id = prepared.owner, prepared.session_id
        self.slots.cover(model, prepared.slot_gen, owner, session_id, [*sent, reply])

    async def keep_chain(
        self, owner: str, session_id: str, messages: list[Message], model: str, gen: int
    ) -> None:
        """Keep a Responses chain's conversation (``messages``: the chat messages of its
        input and its answer) as the session ``session_id``, rewritten whole (a chain may
        branch), and label ``model``'s slot with it (``gen``: the request's generation).
        Past ``[session] max_stored_messages`` nothing is kept (a 409's error, which the
        caller may ignore: the chain itself is stored elsewhere)."""
        limits = Limits(0, self.config.session.max_stored_messages)  # never counted: store.py
        await self.store.append(owner, session_id, messages, model, "", rewind=0, limits=limits)
        self.slots.cover(model, gen, owner, session_id, messages)

    async def delete(
        self,
        owner: str,
        session_id: str,
        kv: ForgetsSessions | None,
        unused_before: float | None = None,
    ) -> bool:
        """Delete a session (not in the middle of a turn) with its KV snapshots; with
        ``unused_before``, only if it was not used since (retention)."""
        ref = SessionRef(session_id, None, owner)
        async with self.hold(ref, self.config.session.queue_timeout_seconds):
            deleted = await self.store.delete(owner, session_id, unused_before)
            if deleted or unused_before is None:
                self.slots.forget(owner, session_id)  # no slot is saved under its name again
                if kv is not None:  # its KV goes with it
                    await asyncio.to_thread(kv.forget_session, owner, session_id)
        return deleted

    def prompt_missing(self, session: Session) -> bool:
        """Whether the session names a system prompt the config no longer defines (its
        turns then go without one)."""
        return bool(session.system_prompt) and session.system_prompt not in (
            self.config.system_prompts
        )

    async def warn_missing_prompts(self) -> dict[str, int]:
        """At start: log each system prompt that stored sessions use but the config lacks."""
        missing = {
            name: n
            for name, n in (await self.store.prompt_use()).items()
            if name not in self.config.system_prompts
        }
        for name, n in sorted(missing.items()):
            log.warning(
                "%d stored session(s) use system prompt %r, which the config no longer "
                "defines: their turns go without it until [system_prompts.%s] is back",
                n,
                name,
                name,
            )
        return missing

    async def check_dropped_prompts(self, new: Config) -> None:
        """Refuse (ConfigError) a config that drops a system prompt stored sessions use."""
        dropped = set(self.config.system_prompts) - set(new.system_prompts)
        if not dropped:
            return
        use = await self.store.prompt_use()
        for name in sorted(dropped):
            if use.get(name):
                raise ConfigError(
                    new.path,
                    f"drops system prompt {name!r}, which {use[name]} stored session(s) "
                    "use; keep it, or delete those sessions first (hotmodel sessions delete ID)",
                    section=f"system_prompts.{name}",
                )

    async def replay_prompt(
        self, model: str, prefer: SessionRef | None = None
    ) -> tuple[Session, Prompt] | None:
        """The session a switch to ``model`` is for (``prefer``, the request's that caused
        it), else the most recently used one, and its bounded context, as ``model``
        counts it. A Responses chain's is its whole conversation: each of its turns
        sends it whole (the Responses API keeps no bounds of hotmodel's)."""
        if prefer is not None:
            window = None if is_chain(prefer.id) else self._window(0)
            session = await self.store.get(prefer.owner, prefer.id, window)
        else:
            session = await self.store.most_recent(self._window(0))
            if session is not None and is_chain(session.id) and session.offset:
                session = await self.store.get(session.owner, session.id)  # all of it
        if session is None or not session.messages:
            return None
        stored = [m.message for m in session.messages]
        if is_chain(session.id):
            return session, build_prompt(None, [], stored, [])
        prompt = build_prompt(self._system(session.system_prompt), [], stored, [])
        prompt.base = session.offset
        await self._bound(prompt, model)
        return session, prompt

    async def replay(self, model: str, prefer: SessionRef | None = None) -> dict[str, Any] | None:
        """Prefill ``prefer``'s (else the most recently used session's) bounded context
        into ``model``."""
        found = await self.replay_prompt(model, prefer)
        if found is None:
            return None
        session, prompt = found
        timeout = self.config.switch.replay_timeout_seconds
        async with self.tenants.use(model, session.owner, timeout) as reuse:
            gen = self.slots.touch(model)  # until the prefill is complete, the slot is nobody's
            t0 = time.monotonic()
            timings = await self.router.prefill(
                model,
                prompt.messages(),
                timeout,
                REPLAY_SETTING,
                cache=reuse,
                slot=self.tenants.pinned(session.owner),  # the slot its turns will use
            )
        self.slots.cover(model, gen, session.owner, session.id, prompt.messages())
        return {
            "session": session.id,
            "messages": len(prompt.messages()),
            "dropped": prompt.drop,
            "prompt_tokens": timings.get("prompt_n"),
            "cache_tokens": timings.get("cache_n"),
            "prompt_ms": timings.get("prompt_ms"),
            "wall_ms": round((time.monotonic() - t0) * 1000, 1),
        }


def _adds(turns: list[Message], kept: list[Message]) -> int:
    """How many messages storing ``turns`` and their answer adds after ``kept``: the answer
    to a trailing assistant message (a prefill) replaces it (see :meth:`complete`)."""
    last = (turns or kept or [{}])[-1]
    replaced = last.get("role") == "assistant" and not last.get("tool_calls")
    return len(turns) + (0 if replaced else 1)
