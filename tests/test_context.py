"""Session context (pure) and the session store (real SQLite files)."""

from __future__ import annotations

import asyncio
import itertools
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from hotmodel.errors import InvalidRequestError, StoreError
from hotmodel.sessions.context import (
    Message,
    Prompt,
    Reconciled,
    bound_messages_and_chars,
    bound_tokens,
    build_prompt,
    estimate_tokens,
    reconcile,
)
from hotmodel.sessions.reply import ReplyAssembler
from hotmodel.sessions.schema import MIGRATIONS, SCHEMA_VERSION
from hotmodel.sessions.sqlite import SqliteStore
from tests.conftest import Stores


def u(text: str) -> Message:
    return {"role": "user", "content": text}


def a(text: str) -> Message:
    return {"role": "assistant", "content": text}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


SYS = {"role": "system", "content": "be brief"}
STORED = [u("hi"), a("hello"), u("how are you"), a("fine")]


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        ([u("next")], [u("next")]),  # only the new turn
        ([*STORED, u("next")], [u("next")]),  # the whole history again
        ([SYS, *STORED, u("next")], [u("next")]),  # ... with a system prompt
        ([u("how are you"), a("fine"), u("next")], [u("next")]),  # a window of the end
        ([u("hi"), u("next")], [u("hi"), u("next")]),  # no overlap: all new
        ([u("hi")], [u("hi")]),  # a single message is a new turn, even a repeated one
        # the client's copy of an answer, trimmed or as a list of text parts: the same message
        ([u("hi"), a(" hello\n"), u("how are you"), a("fine "), u("next")], [u("next")]),
        ([u("how are you"), {"role": "assistant", "content": [_text("fine")]}, u("x")], [u("x")]),
    ],
)
def test_new_turns(incoming: list[Message], expected: list[Message]) -> None:
    assert reconcile(STORED, incoming) == Reconciled(None, expected)


@pytest.mark.parametrize(
    ("incoming", "keep", "turns"),
    [
        # "regenerate": the conversation up to the last question again
        ([u("hi"), a("hello"), u("how are you")], 3, []),
        ([SYS, u("hi"), a("hello"), u("how are you")], 3, []),
        # an edited question: the stored history is cut where the two part
        ([u("hi"), a("hello"), u("how old are you")], 2, [u("how old are you")]),
        # a client that keeps only the end of its conversation, regenerating
        ([a("hello"), u("how are you")], 3, []),
        # an edited first question: the messages after it sit where they sat
        (
            [u("HI!"), a("hello"), u("how are you"), a("fine"), u("q")],
            0,
            [u("HI!"), a("hello"), u("how are you"), a("fine"), u("q")],
        ),
        # two new messages in a row, one of them equal to a stored one: new turns
        ([u("x"), a("hello")], None, [u("x"), a("hello")]),
        # the whole conversation and a new question: nothing departs
        ([u("hi"), a("hello"), u("how are you"), a("fine"), u("q")], None, [u("q")]),
    ],
)
def test_a_resend_that_departs_from_the_stored_history_replaces_its_end(
    incoming: list[Message], keep: int | None, turns: list[Message]
) -> None:
    assert reconcile(STORED, incoming) == Reconciled(keep, turns)


def test_new_turns_retry_after_an_unanswered_turn() -> None:
    # the last stored turn is the user's (its answer was aborted): a retry adds nothing twice
    assert reconcile([u("q")], [u("q")]) == Reconciled(None, [])


def test_new_turns_compares_list_content() -> None:
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert reconcile(
        [{"role": "user", "content": parts}, a("ok")],
        [{"role": "user", "content": parts}, a("ok"), u("more")],
    ) == Reconciled(None, [u("more")])
    other = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "y"}}]
    looked: Message = {"role": "user", "content": other}
    assert reconcile([{"role": "user", "content": parts}], [looked]) == Reconciled(None, [looked])


def _prompt(n_exchanges: int, size: int = 10) -> Prompt:
    history: list[Message] = []
    for i in range(n_exchanges):
        history += [u(f"{i:02d}" + "u" * size), a(f"{i:02d}" + "a" * size)]
    return build_prompt("SYSTEM", [], history[:-1], [])  # ends with a user turn


def test_preset_and_request_system_messages_are_pinned() -> None:
    p = build_prompt("PRESET", [SYS, u("x")], [u("old"), a("ans")], [u("x")])
    assert p.pinned == [{"role": "system", "content": "PRESET"}, SYS]
    assert p.messages() == [p.pinned[0], SYS, u("old"), a("ans"), u("x")]


def test_message_bound_drops_oldest_at_user_turns() -> None:
    p = _prompt(5)
    bound_messages_and_chars(p, max_messages=4, max_chars=10**6)
    kept = p.messages()
    assert kept[0]["content"] == "SYSTEM"
    assert kept[1]["role"] == "user"  # history starts with a user turn
    assert len(kept) - 1 <= 4
    assert kept[-1] == p.history[-1]  # the newest turn is kept
    assert p.history[0] == u("00" + "u" * 10)  # the prompt's history itself is intact


def test_char_bound() -> None:
    p = _prompt(5, size=100)
    bound_messages_and_chars(p, max_messages=100, max_chars=350)
    assert sum(len(m["content"]) for m in p.messages()) <= 350
    assert p.messages()[-1] == p.history[-1]


def test_newest_turn_alone_too_big_is_a_clear_400() -> None:
    p = build_prompt(None, [], [], [u("x" * 500)])
    with pytest.raises(InvalidRequestError) as info:
        bound_messages_and_chars(p, max_messages=10, max_chars=100)
    assert info.value.param == "messages"
    assert "500 characters" in str(info.value)


class Counter:
    """An exact counter stand-in that counts its calls (tokens = estimate / 2)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, messages: list[Message]) -> int:
        self.calls += 1
        return estimate_tokens(messages) // 2


def _fit(p: Prompt, budget: int, mode: str) -> Counter:
    counter = Counter()
    asyncio.run(bound_tokens(p, budget, mode, counter))
    return counter


def test_auto_makes_no_tokenizer_call_far_under_budget() -> None:
    p = _prompt(10)
    assert _fit(p, 100_000, "auto").calls == 0
    assert p.drop == 0


def test_auto_counts_when_near_budget_and_binary_searches() -> None:
    p = _prompt(40)
    full = estimate_tokens(p.messages()) // 2
    counter = _fit(p, full // 3, "auto")
    assert p.tokens is not None and p.tokens <= full // 3
    cuts = 40
    assert 1 <= counter.calls <= 1 + math.ceil(math.log2(cuts)) + 1
    # the earliest fitting cut: one cut earlier would not fit
    earlier = [c for c in Prompt(p.pinned, p.history).cut_points() if c < p.drop][-1]
    assert estimate_tokens(p.messages(earlier)) // 2 > full // 3


def test_exact_mode_always_counts_once_and_estimate_mode_never() -> None:
    assert _fit(_prompt(3), 100_000, "exact").calls == 1
    p = _prompt(40)
    assert _fit(p, 300, "estimate").calls == 0
    assert estimate_tokens(p.messages()) <= 300


def test_token_budget_that_cannot_fit_is_a_400() -> None:
    p = build_prompt("S" * 3000, [], [], [u("x")])
    with pytest.raises(InvalidRequestError, match="max_prompt_tokens = 50"):
        _fit(p, 50, "exact")


SSE = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\n\n'
    b'data: {"choices":[{"index":0,"finish_reason":"stop","delta":{}}]}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("step", [1, 7, 50, len(SSE)])
def test_reply_assembler_any_chunking(step: int) -> None:
    asm = ReplyAssembler()
    for i in range(0, len(SSE), step):
        asm.feed(SSE[i : i + step])
    assert asm.message() == {"role": "assistant", "content": "Hello"}


def test_reply_assembler_unfinished_or_errored_stream_is_nothing() -> None:
    asm = ReplyAssembler()
    asm.feed(SSE[:120])
    assert asm.message() is None
    asm2 = ReplyAssembler()
    asm2.feed(SSE[:-40] + b'data: {"error":{"message":"x"}}\n\n')
    assert asm2.message() is None


def test_store_round_trip_and_persistence(store: Stores, tmp_path: Path) -> None:
    async def first() -> None:
        async with store() as st:
            assert await st.get("", "abc") is None  # reading never creates
            await st.append("", "abc", [u("hi"), a("hello")], "smollm2", "pirate")
            s = await st.get("", "abc")
            assert s is not None and s.system_prompt == "pirate" and len(s.messages) == 2
            await st.append("", "abc", [u("again"), a("yes")], "gemma3", "pirate")
            await st.append("", "other", [u("x"), a("y")], "gemma3", "")

    async def second() -> dict[str, Any]:
        async with store() as st:
            s = await st.get("", "abc")
            assert s is not None
            assert [m.message for m in s.messages] == [u("hi"), a("hello"), u("again"), a("yes")]
            assert [m.model for m in s.messages] == [None, "smollm2", None, "gemma3"]
            listed = await st.list("")
            assert [x.id for x in listed] == ["other", "abc"]  # most recently used first
            assert listed[1].message_count == 4 and listed[1].system_prompt == "pirate"
            recent = await st.most_recent()
            assert recent is not None and recent.id == "other"
            assert await st.delete("", "abc") is True
            assert await st.delete("", "abc") is False
            assert await st.get("", "abc") is None
            return s.to_json()

    asyncio.run(first())
    exported = asyncio.run(second())
    assert exported["messages"][1] == {
        **a("hello"),
        "model": "smollm2",
        "created_at": exported["messages"][1]["created_at"],
    }
    if store.backend != "sqlite":
        return
    conn = sqlite3.connect(tmp_path / "s.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2  # cascade: other's
    conn.close()


def test_store_migrates_a_version_1_file(tmp_path: Path) -> None:
    """A store written before 'preset' was renamed opens with its sessions intact."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    conn.execute("INSERT INTO sessions VALUES ('old', 'pirate', 1.0, 1.0)")
    conn.commit()
    conn.close()

    async def scenario() -> Any:
        async with SqliteStore(path) as store:
            return await store.get("", "old")

    session = asyncio.run(scenario())
    assert session is not None and session.system_prompt == "pirate"


def test_store_errors_are_store_errors(tmp_path: Path) -> None:
    """A SQLite failure (here: a read-only file) is mapped, not passed through raw."""
    path = tmp_path / "ro.sqlite3"

    async def scenario() -> None:
        async with SqliteStore(path) as store:
            await store.append("", "s", [u("hi"), a("hello")], "m", "")
            await store._call(lambda: store._db().execute("PRAGMA query_only = ON"))
            await store.append("", "s", [u("again"), a("no")], "m", "")

    with pytest.raises(StoreError, match=r"the session store .* failed: attempt to write"):
        asyncio.run(scenario())


def test_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()

    async def scenario() -> None:
        async with SqliteStore(path):
            pass

    with pytest.raises(StoreError, match="newer than this hotmodel knows"):
        asyncio.run(scenario())


def _drops(step: int, turns: int, max_messages: int) -> list[int]:
    """The drop chosen on each turn of a growing conversation (user + assistant a turn)."""
    history: list[Message] = []
    out = []
    for i in range(turns):
        history += [u(f"question {i}")]
        prompt = build_prompt(None, [], history[:-1], history[-1:])
        prompt.step = step
        bound_messages_and_chars(prompt, max_messages, 10**9)
        assert len(prompt.messages()) <= max_messages
        assert prompt.history[prompt.drop]["role"] == "user"
        out.append(prompt.drop)
        history += [a(f"answer {i}")]
    return out


def test_trimming_in_steps_keeps_the_prompts_beginning_between_steps() -> None:
    every_turn = _drops(step=1, turns=40, max_messages=16)
    in_steps = _drops(step=4, turns=40, max_messages=16)

    def changes(drops: list[int]) -> int:
        return sum(1 for x, y in itertools.pairwise(drops) if x != y)

    # without steps the beginning moves on every turn past the bound
    assert changes(every_turn) >= 30
    # in steps of 4 messages (2 turns) it moves at most every other turn
    assert changes(in_steps) <= changes(every_turn) // 2 + 1
    assert all(s >= e for s, e in zip(in_steps, every_turn, strict=True))  # never more kept


def test_token_trimming_moves_in_steps_too() -> None:
    history = [m for i in range(30) for m in (u(f"q{i} " * 20), a(f"a{i} " * 20))]

    async def count(messages: list[Message]) -> int:
        return estimate_tokens(messages)

    async def cut(step: int, extra: int) -> int:
        prompt = build_prompt(None, [], history[: 40 + extra], [])
        prompt.step = step
        await bound_tokens(prompt, 900, "exact", count)
        assert await count(prompt.messages()) <= 900
        return prompt.drop

    plain = [asyncio.run(cut(1, e)) for e in range(0, 12, 2)]
    stepped = [asyncio.run(cut(8, e)) for e in range(0, 12, 2)]
    assert len(set(stepped)) < len(set(plain))


def test_a_turn_reads_only_a_window_and_cuts_the_same(store: Stores) -> None:
    """A long session: reading only its last messages gives the same prompt as reading
    all of them (the step grid counts from the session's first message)."""

    async def scenario() -> None:
        async with store() as st:
            history = [m for i in range(300) for m in (u(f"q{i}"), a(f"a{i}"))]
            await st.append("", "long", history, "m", "")
            full = await st.get("", "long")
            window = await st.get("", "long", last=40)
            assert full is not None and window is not None
            assert len(window.messages) == 40 and window.offset == 560
            assert [m.message for m in window.messages] == [m.message for m in full.messages][-40:]
            prompts = []
            for session in (full, window):
                stored = [m.message for m in session.messages]
                prompt = build_prompt(None, [u("next")], stored, [u("next")])
                prompt.step, prompt.base = 4, session.offset
                bound_messages_and_chars(prompt, 16, 10**9)
                prompts.append(prompt.messages())
            assert prompts[0] == prompts[1]

    asyncio.run(scenario())


def test_a_reply_continues_a_trailing_assistant_message_it_begins_with() -> None:
    from hotmodel.sessions.context import continues

    prefill = {"role": "assistant", "content": "The capital is"}
    assert continues(prefill, {"role": "assistant", "content": "The capital is Paris."})
    assert continues({"role": "assistant", "content": ""}, {"role": "assistant", "content": "x"})
    parts = {"role": "assistant", "content": [{"type": "text", "text": " The capital is "}]}
    assert continues(parts, {"role": "assistant", "content": "The capital is Paris."})
    # a new answer (llama-server started with --no-prefill-assistant), a user turn, tool calls
    assert not continues(prefill, {"role": "assistant", "content": "Paris."})
    assert not continues({"role": "user", "content": ""}, {"role": "assistant", "content": "x"})
    calls = {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}
    assert not continues(calls, {"role": "assistant", "content": "x"})
    # llama-server joins a prefill's text parts with a blank line
    two = {"role": "assistant", "content": [{"type": "text", "text": "The capital"}] * 2}
    assert continues(two, {"role": "assistant", "content": "The capital\n\nThe capital is"})


def test_an_empty_trailing_assistant_message_is_dropped() -> None:
    from hotmodel.sessions.context import without_empty_prefill

    q: dict[str, Any] = {"role": "user", "content": "Q"}
    empty: object
    for empty in ("", "  ", None, []):
        assert without_empty_prefill([q, {"role": "assistant", "content": empty}]) == [q]
    kept = [q, {"role": "assistant", "content": "A"}]
    assert without_empty_prefill(kept) == kept
    calls: list[dict[str, Any]] = [q, {"role": "assistant", "content": "", "tool_calls": [{}]}]
    assert without_empty_prefill(calls) == calls
    alone = [{"role": "assistant", "content": ""}]  # nothing would be left to send
    assert without_empty_prefill(alone) == alone
