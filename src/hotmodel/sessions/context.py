"""Session context, pure: which turns are new, what is sent, and how it is bounded.

The prompt sent for a session is ``pinned + history[drop:]``: ``pinned`` holds
the preset's system prompt and any system messages of the request (never
trimmed); ``history`` the stored turns and the new ones, oldest first.
Trimming only ever raises ``drop``, and only to the start of a user turn (so
the kept history starts with a user turn, as strict chat templates such as
Gemma's require), and never past the newest user turn. The stored session is
not touched: bounds shape only what is sent.

Token budgets are met with as few tokenizer calls as possible: in ``auto``
mode a conservative estimate decides whether a count is needed at all, and
the cut is found by binary search over the possible drop points.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hotmodel.errors import InvalidRequestError

Message = dict[str, Any]
TokenCounter = Callable[[list[Message]], Awaitable[int]]

# The estimate over-counts on purpose (English runs ~4 characters a token);
# auto mode asks the tokenizer only above this share of the budget.
_CHARS_PER_TOKEN = 3.0
_TOKENS_PER_MESSAGE = 8
_TOKENS_PER_PROMPT = 16
AUTO_EXACT_ABOVE = 0.8


def text_of(message: Message) -> str:
    """The text of a message: its string content, or the text parts of a list."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (p.get("text") for p in content if isinstance(p, dict))
        return "".join(t for t in texts if isinstance(t, str))
    return ""


def chars(messages: Sequence[Message]) -> int:
    return sum(len(text_of(m)) for m in messages)


def estimate_tokens(messages: Sequence[Message]) -> int:
    """A cheap, deliberately high token estimate (no tokenizer)."""
    return (
        math.ceil(chars(messages) / _CHARS_PER_TOKEN)
        + _TOKENS_PER_MESSAGE * len(messages)
        + _TOKENS_PER_PROMPT
    )


def _content_key(content: object) -> str:
    """Content as two copies of one message are compared: its text (a string, or a list
    of text parts, as clients differ) without surrounding whitespace; anything else as
    JSON."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content).strip()
    return json.dumps(content, sort_keys=True)


def _key(message: Message) -> tuple[str, str]:
    return str(message.get("role")), _content_key(message.get("content"))


def continues(last: Message, reply: Message) -> bool:
    """Whether ``reply`` continues ``last``, the prompt's final message: llama-server
    continues a trailing assistant message (a prefill, its default ``--prefill-assistant``)
    and answers with that message whole, its beginning included (text parts joined by
    blank lines, so whitespace is not compared)."""
    if last.get("role") != "assistant" or last.get("tool_calls"):
        return False
    return _bare(reply.get("content")).startswith(_bare(last.get("content")))


def _bare(content: object) -> str:
    return "".join(_content_key(content).split())


def without_empty_prefill(messages: list[Message]) -> list[Message]:
    """``messages`` without a final assistant message that says nothing: llama-server
    would continue it without the assistant's turn header (the model then writes one
    itself), where the client asked for an answer."""
    last = messages[-1] if len(messages) > 1 else {}
    if (
        last.get("role") == "assistant"
        and not last.get("tool_calls")
        and not _bare(last.get("content"))
    ):
        return messages[:-1]
    return messages


@dataclass(frozen=True, slots=True)
class Reconciled:
    """How a request's messages meet the stored ones: ``keep`` stored messages stay (None:
    all), then ``turns`` are new."""

    keep: int | None
    turns: list[Message]


def reconcile(
    stored: Sequence[Message], incoming: Sequence[Message], at_start: bool = True
) -> Reconciled:
    """What of ``incoming`` (its non-system messages) the session does not have yet.

    Clients either send only their new turn or resend the whole (or the end of
    the) conversation: the longest run at the start of ``incoming`` that repeats
    the end of ``stored`` is dropped, so nothing is stored twice. A resend that
    departs from what is stored (a regenerated answer: the conversation up to the
    last question again; an edited question) is the client's conversation: when
    at least two of its first messages repeat a stored run that goes on
    differently, the stored history is cut where they part (``keep``) and the
    rest of ``incoming`` follows. An edited first question: when ``stored`` begins
    the session (``at_start``) and at least two messages of ``incoming`` sit where
    they sit in ``stored``, the history is cut at the first that differs. A single
    message is always a new turn.
    """
    turns = [m for m in incoming if m.get("role") != "system"]
    # an overlap is at most as long as the turns: only that end of ``stored`` is compared
    n = min(len(stored), len(turns))
    stored_keys = [_key(m) for m in stored[len(stored) - n :]]
    turn_keys = [_key(m) for m in turns[:n]]
    for k in range(n, 0, -1):
        if stored_keys[-k:] == turn_keys[:k]:
            return Reconciled(None, turns[k:])
    if len(turns) >= 2:  # rarer: every message's key, once
        have, want = [_key(m) for m in stored], [_key(m) for m in turns]
        parted = _parting(have, want)
        if parted is not None:
            at, matched = parted
            return Reconciled(at, turns[matched:])
        if at_start:
            same = [a == b for a, b in zip(have, want, strict=False)]
            if sum(same) >= 2 and not all(same):
                first = same.index(False)
                return Reconciled(first, turns[first:])
    return Reconciled(None, turns)


def _parting(
    have: Sequence[tuple[str, str]], want: Sequence[tuple[str, str]]
) -> tuple[int, int] | None:
    """Where a resend (``want``, message keys) leaves the stored history (``have``): (stored
    messages kept, turns matched) for the longest run of at least two (the latest of
    equals), else None."""
    best: tuple[int, int] | None = None
    for j in range(len(have) - 1, -1, -1):
        length = 0
        while length < len(want) and j + length < len(have) and have[j + length] == want[length]:
            length += 1
        if length >= 2 and (best is None or length > best[1]):
            best = (j + length, length)
    return best


@dataclass
class Prompt:
    """What is sent for a session: ``pinned + history[drop:]``."""

    pinned: list[Message]
    history: list[Message]
    drop: int = 0
    tokens: int | None = None  # exact count of the final prompt, when one was made
    step: int = 1  # cuts move in steps of this many messages (1: to the earliest fit)
    base: int = 0  # stored messages before ``history`` (a window was read): the step grid
    # is counted from the session's first message, so the cut is the same however read

    def messages(self, drop: int | None = None) -> list[Message]:
        return self.pinned + self.history[self.drop if drop is None else drop :]

    def cut_points(self) -> list[int]:
        """Where the kept history may start: user turns at or after ``drop``, up to
        the newest user turn (which is never dropped)."""
        users = [i for i, m in enumerate(self.history) if m.get("role") == "user"]
        if not users:
            return [self.drop]
        return [i for i in users if i >= self.drop] or [users[-1]]

    def chars_from(self) -> list[int]:
        """``chars(self.messages(cut))`` for every ``cut`` (and one past the end), in one
        pass: a bound then tries each cut without adding up the history again."""
        sizes = [len(text_of(m)) for m in self.history]
        out = [0] * (len(sizes) + 1)
        for i in range(len(sizes) - 1, -1, -1):
            out[i] = out[i + 1] + sizes[i]
        pinned = chars(self.pinned)
        return [pinned + n for n in out]


def build_prompt(
    system: str | None,
    request_messages: Sequence[Message],
    stored: Sequence[Message],
    turns: Sequence[Message],
) -> Prompt:
    pinned: list[Message] = [{"role": "system", "content": system}] if system else []
    pinned += [m for m in request_messages if m.get("role") == "system"]
    return Prompt(pinned=pinned, history=[*stored, *turns])


def stable_cut(prompt: Prompt, cuts: Sequence[int], cut: int) -> int:
    """``cut`` moved up to the next multiple of ``prompt.step`` (then to a user turn).

    A cut that follows the growing history by one turn each time changes the
    prompt's beginning on every turn, so llama-server's prompt cache never
    hits. Moving the cut in steps keeps the beginning the same for the turns
    until the next step: a cut back to a low-water mark. A later cut always
    fits whatever the earlier one did (fewer messages, fewer characters and
    tokens), and it never passes the newest user turn.
    """
    if cut <= 0 or prompt.step <= 1:
        return cut
    target = math.ceil((prompt.base + cut) / prompt.step) * prompt.step - prompt.base
    return next((c for c in cuts if c >= target), cut)


def bound_messages_and_chars(prompt: Prompt, max_messages: int, max_chars: int) -> None:
    """Raise ``prompt.drop`` until the history fits both bounds."""
    cuts = prompt.cut_points()
    need = max(prompt.drop, len(prompt.history) - max_messages)
    size_from = prompt.chars_from()
    for cut in cuts:
        if cut >= need and size_from[cut] <= max_chars:
            prompt.drop = stable_cut(prompt, cuts, cut)
            return
    newest = cuts[-1]
    size = size_from[newest]
    raise InvalidRequestError(
        f"the prompt does not fit: with only the newest turn it has {size}"
        f" characters and {len(prompt.history) - newest} message(s) "
        f"(session.max_prompt_chars = {max_chars}, max_session_messages = {max_messages})",
        param="messages",
    )


async def bound_tokens(prompt: Prompt, budget: int, mode: str, count: TokenCounter) -> None:
    """Raise ``prompt.drop`` until the prompt fits ``budget`` tokens (0: no bound)."""
    if budget <= 0:
        return
    cuts = prompt.cut_points()
    size_from = prompt.chars_from()

    def estimate(cut: int) -> int:  # estimate_tokens(prompt.messages(cut)), from the sums
        n_messages = len(prompt.pinned) + len(prompt.history) - cut
        return (
            math.ceil(size_from[cut] / _CHARS_PER_TOKEN)
            + _TOKENS_PER_MESSAGE * n_messages
            + _TOKENS_PER_PROMPT
        )

    if mode == "estimate":
        fitting = next((c for c in cuts if estimate(c) <= budget), None)
        if fitting is None:
            raise _over_budget(budget, estimate(cuts[-1]), "estimated")
        prompt.drop = stable_cut(prompt, cuts, fitting)  # never before the current drop
        return
    if mode == "auto" and estimate(cuts[0]) <= budget * AUTO_EXACT_ABOVE:
        return  # far under budget: no tokenizer call

    async def exact(cut: int) -> int:
        return await count(prompt.messages(cut))

    first = await exact(cuts[0])
    if first <= budget:
        prompt.tokens = first
        return
    # counts fall as the cut moves later: binary search for the earliest fitting cut
    lo, hi = 1, len(cuts) - 1
    best: tuple[int, int] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        n = await exact(cuts[mid])
        if n <= budget:
            best, hi = (cuts[mid], n), mid - 1
        else:
            lo = mid + 1
    if best is None:
        raise _over_budget(budget, None, "counted")
    prompt.drop = stable_cut(prompt, cuts, best[0])
    prompt.tokens = best[1] if prompt.drop == best[0] else None


def _over_budget(budget: int, tokens: int | None, how: str) -> InvalidRequestError:
    size = f" ({how}: {tokens} tokens)" if tokens is not None else ""
    return InvalidRequestError(
        f"the prompt does not fit session.max_prompt_tokens = {budget} even with only the "
        f"preset and the newest turn{size}",
        param="messages",
    )
