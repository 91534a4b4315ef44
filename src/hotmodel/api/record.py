"""What one HTTP request did, as the metrics and the access log see it.

The :class:`~hotmodel.api.observe.Observe` middleware puts a
:class:`RequestRecord` into the request's scope state; the chat path fills in
what only it knows (the model, the session, when the upstream call started and
ended, the first token, the token counts) by plain attribute writes, so the hot
path pays a few stores, not a lookup or an allocation per chunk. Token counts
come from the ``timings`` (or ``usage``) object that llama-server puts at the
end of its answer: only the last bytes are searched, never the whole body
parsed.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

from starlette.types import Scope

RECORD = "record"  # the key in scope["state"]

# An incoming X-Request-Id is kept only when it cannot break a log line or a header.
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Integer fields of llama-server's ``timings`` and OpenAI's ``usage``. A JSON string
# cannot hold an unescaped '"key":', so a match is never inside generated text.
_FIELD = re.compile(
    rb'"(cache_n|prompt_n|predicted_n|prompt_tokens|completion_tokens|cached_tokens'
    rb'|input_tokens|output_tokens|cache_read_input_tokens|cache_creation_input_tokens)":(\d+)'
)
# The first generated text of a stream: llama-server's first chunk only names the role
# ("content":null); reasoning models send "reasoning_content":"..." first, which counts.
# (/completion and /infill stream "content" too; /v1/completions streams "text";
# Anthropic's text_delta "text" too, OpenAI Responses' output_text.delta "delta".)
_TEXT, _TEXT_SPACED, _COMPLETION_TEXT = b'content":"', b'content": "', b'"text":"'
_DELTA_TEXT = b'"delta":"'


def new_request_id() -> str:
    """A fresh request id: 16 hex digits (64 random bits)."""
    return secrets.token_hex(8)


def incoming_request_id(scope: Scope) -> str | None:
    """The client's own ``X-Request-Id`` when it is short and safe (else None)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SAFE_ID.fullmatch(text) else None
    return None


def has_text(chunk: bytes) -> bool:
    """Whether a relayed stream chunk carries generated text (the first token)."""
    return (
        _TEXT in chunk or _TEXT_SPACED in chunk or _COMPLETION_TEXT in chunk or _DELTA_TEXT in chunk
    )


@dataclass(slots=True)
class Usage:
    """Token counts of one answer."""

    prompt: int
    completion: int
    cached: int  # prompt tokens served from llama-server's prompt cache (timings.cache_n)


def usage_of(data: bytes) -> Usage | None:
    """Token counts from the end of an answer (a JSON body or the last SSE events).

    llama-server ends a chat answer with ``timings`` (``prompt_n`` evaluated, ``cache_n``
    from the cache, ``predicted_n`` generated), after ``usage`` when there is
    one; the last value of each field wins (per-token timings repeat them). Without
    ``timings`` (a plain Responses or Anthropic answer), ``usage``: OpenAI's
    ``prompt_tokens``/``completion_tokens``, Responses' ``input_tokens`` (the whole
    prompt) and ``output_tokens``, or Anthropic's, whose ``input_tokens`` leaves out
    what was read from the cache (``cache_read_input_tokens``): that is added.
    """
    starts = [at for at in (data.rfind(b'"usage":'), data.rfind(b'"timings":')) if at >= 0]
    if not starts:
        return None
    found = {m.group(1): int(m.group(2)) for m in _FIELD.finditer(data, min(starts))}
    if b"predicted_n" in found:
        cached = found.get(b"cache_n", 0)
        return Usage(found.get(b"prompt_n", 0) + cached, found[b"predicted_n"], cached)
    if b"completion_tokens" in found:
        return Usage(
            found.get(b"prompt_tokens", 0),
            found[b"completion_tokens"],
            found.get(b"cached_tokens", 0),
        )
    if b"output_tokens" in found or b"input_tokens" in found:
        prompt = found.get(b"input_tokens", 0)
        cached = found.get(b"cached_tokens", 0)
        if b"cache_read_input_tokens" in found:  # Anthropic's: input_tokens is what was read
            cached = found[b"cache_read_input_tokens"]
            prompt += cached + found.get(b"cache_creation_input_tokens", 0)
        return Usage(prompt, found.get(b"output_tokens", 0), cached)
    return None


def _joined(opening: Usage | None, end: Usage | None) -> Usage | None:
    """An Anthropic stream's counts: the prompt's from its first event, the answer's
    length from its last."""
    if opening is None or end is None:
        return end or opening
    first = opening if opening.prompt else end  # the prompt: as its first event said
    return Usage(first.prompt, end.completion or opening.completion, first.cached)


@dataclass(slots=True)
class RequestRecord:
    """One request, from the first byte in to the last byte out (times: perf_counter)."""

    request_id: str
    method: str
    path: str
    started: float
    route: str = "other"
    status: int = 0  # 0: no answer was started (the client left, or the server stopped)
    model: str | None = None
    session: str | None = None
    stream: bool = False
    upstream_started: float | None = None
    upstream_ended: float | None = None
    first_token: float | None = None
    usage: Usage | None = None
    opening: Usage | None = None  # an Anthropic stream's message_start counts (its prompt)

    @classmethod
    def detached(cls) -> RequestRecord:
        """A record nobody reads (the chat app driven without the middleware, in tests)."""
        return cls(new_request_id(), "", "", time.perf_counter())

    def upstream_start(self) -> None:
        self.upstream_started = time.perf_counter()

    def upstream_done(self, tail: bytes) -> None:
        """The upstream answer ended; ``tail`` is its body or its last chunks."""
        self.upstream_ended = time.perf_counter()
        self.usage = usage_of(tail)
        if self.opening is not None:
            self.usage = _joined(self.opening, self.usage)

    def upstream_seconds(self, now: float) -> float | None:
        """Time from sending to llama-server to its last byte (to ``now`` if it never ended)."""
        if self.upstream_started is None:
            return None
        return (self.upstream_ended or now) - self.upstream_started

    def server_timing(self, now: float) -> bytes:
        """The ``Server-Timing`` header's value when the answer starts: hotmodel's own time
        so far and, once llama-server was asked, its time. A whole answer's upstream time
        is complete here; a stream's is the time to its first bytes."""
        total = now - self.started
        upstream = self.upstream_seconds(now)
        if upstream is None:
            return f"hotmodel;dur={total * 1000:.3f}".encode()
        own = max(0.0, total - upstream) * 1000
        return f"hotmodel;dur={own:.3f}, upstream;dur={upstream * 1000:.3f}".encode()


def record_of(scope: Scope) -> RequestRecord | None:
    """The request's record, when the :class:`~hotmodel.api.observe.Observe` middleware runs."""
    state = scope.get("state")
    record = state.get(RECORD) if state else None
    return record if isinstance(record, RequestRecord) else None
