"""Sessions: the conversation belongs to hotmodel, not to the loaded model.

:class:`SessionService` prepares the prompt for a request that names a
session (stored history + new turns + the preset prompt, bounded), records
the turns once the answer is complete, and replays the most recently used
session into a freshly loaded model so the next turn hits its prompt cache.
:class:`ReplyAssembler` rebuilds the assistant message from SSE deltas; a
stream that ends without a ``finish_reason`` yields nothing to store.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from hotmodel.config import Config
from hotmodel.context import (
    Message,
    Prompt,
    bound_messages_and_chars,
    bound_tokens,
    build_prompt,
    new_turns,
)
from hotmodel.errors import InvalidRequestError, RouterProtocolError
from hotmodel.router_client import RouterClient
from hotmodel.session_store import SessionStore

MAX_SESSION_ID = 128


@dataclass
class Prepared:
    """A session request on its way: what to send, and what to store once answered."""

    session_id: str
    turns: list[Message]
    prompt: Prompt


class ReplyAssembler:
    """Rebuilds the assistant message from a chat completion SSE stream, chunk by chunk."""

    def __init__(self) -> None:
        self._buffer = b""
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self.finish_reason: str | None = None
        self.error = False

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if "error" in event:
                self.error = True
                continue
            for choice in event.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str):
                    self._content.append(delta["content"])
                if isinstance(delta.get("reasoning_content"), str):
                    self._reasoning.append(delta["reasoning_content"])
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]

    def message(self) -> Message | None:
        """The complete assistant message, or None when the stream did not finish."""
        if self.finish_reason is None or self.error:
            return None
        message: Message = {"role": "assistant", "content": "".join(self._content)}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        return message


class SessionService:
    def __init__(self, config: Config, store: SessionStore, router: RouterClient) -> None:
        self.config = config
        self.store = store
        self.router = router
        self.token_calls = 0  # tokenizer round trips made so far (for tests and metrics)

    def _system(self, preset: str) -> str | None:
        if not preset:
            return None
        return self.config.prompts[preset].system

    def _check_preset(self, preset: str) -> None:
        if preset and preset not in self.config.prompts:
            known = ", ".join(self.config.prompts) or "none defined"
            raise InvalidRequestError(
                f"preset {preset!r} is not defined (presets: {known})", param="preset"
            )

    async def prepare(
        self, session_id: object, preset: object, request_messages: list[Message], model: str
    ) -> Prepared:
        if not isinstance(session_id, str) or not session_id or len(session_id) > MAX_SESSION_ID:
            raise InvalidRequestError(
                f"session id must be a non-empty string of at most {MAX_SESSION_ID} characters",
                param="session_id",
            )
        if preset is not None and not isinstance(preset, str):
            raise InvalidRequestError("'preset' must be a string", param="preset")
        if preset is not None:
            self._check_preset(preset)
        session = await self.store.get_or_create(
            session_id, self.config.session.default_preset if preset is None else preset
        )
        if preset is not None and preset != session.preset:
            await self.store.set_preset(session_id, preset)
        stored = [m.message for m in session.messages]
        turns = new_turns(stored, request_messages)
        prompt = build_prompt(
            self._system(preset if preset is not None else session.preset),
            request_messages,
            stored,
            turns,
        )
        await self._bound(prompt, model)
        return Prepared(session_id, turns, prompt)

    async def _bound(self, prompt: Prompt, model: str) -> None:
        cfg = self.config.session
        bound_messages_and_chars(prompt, cfg.max_session_messages, cfg.max_prompt_chars)

        async def count(messages: list[Message]) -> int:
            self.token_calls += 1
            return await count_tokens(self.router, model, messages)

        await bound_tokens(prompt, cfg.max_prompt_tokens, cfg.token_count_mode, count)

    async def complete(self, prepared: Prepared, reply: Message, model: str) -> None:
        """Store the request's new turns and the answer, in one transaction."""
        await self.store.append(prepared.session_id, [*prepared.turns, reply], model)

    async def replay(self, model: str) -> dict[str, Any] | None:
        """Prefill the most recently used session's bounded context into ``model``."""
        session = await self.store.most_recent()
        if session is None or not session.messages:
            return None
        stored = [m.message for m in session.messages]
        prompt = build_prompt(self._system(session.preset), [], stored, [])
        await self._bound(prompt, model)
        body = {
            "model": model,
            "messages": prompt.messages(),
            "max_tokens": 1,
            "cache_prompt": True,
            "temperature": 0,
        }
        t0 = time.monotonic()
        answer = await self.router.post_json("/v1/chat/completions", body, timeout=600)
        timings = answer.get("timings", {})
        return {
            "session": session.id,
            "messages": len(prompt.messages()),
            "dropped": prompt.drop,
            "prompt_tokens": timings.get("prompt_n"),
            "prompt_ms": timings.get("prompt_ms"),
            "wall_ms": round((time.monotonic() - t0) * 1000, 1),
        }


async def count_tokens(router: RouterClient, model: str, messages: list[Message]) -> int:
    """Exact prompt tokens for ``messages`` on ``model``: its own chat template and tokenizer."""
    templated = await router.post_json("/apply-template", {"model": model, "messages": messages})
    tokens = await router.post_json(
        "/tokenize",
        {
            "model": model,
            "content": templated.get("prompt", ""),
            "add_special": True,
            "parse_special": True,
        },
    )
    if not isinstance(tokens.get("tokens"), list):
        raise RouterProtocolError(f"unexpected /tokenize answer: {str(tokens)[:200]}")
    return len(tokens["tokens"])
