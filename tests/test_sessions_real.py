"""Sessions against the real router and both real models (two tokenizers, two templates)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.conftest import HotmodelProcess, answer, chat, run_hotmodel, two_models, user

pytestmark = pytest.mark.slow  # drives the real llama-server

BRIEF = "You are a helpful assistant. Answer in one short sentence."
PROMPTS = (
    f'[system_prompts.brief]\nsystem = "{BRIEF}"\n'
    '[system_prompts.pirate]\nsystem = "Talk like a pirate."'
)


# a chat turn's length and sampling here: short, and the same answer every time
GREEDY: dict[str, Any] = {"max_tokens": 8, "temperature": 0}


def serving(
    folder: Path, real_models: dict[str, Path], session: str = "", extra: str = ""
) -> contextlib.AbstractContextManager[HotmodelProcess]:
    return two_models(folder, real_models, session=session, extra=extra, tail=PROMPTS)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, real_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    with serving(
        tmp_path_factory.mktemp("sessions"),
        real_models,
        session='default_system_prompt = "brief"\nmax_prompt_tokens = 1500',
    ) as hp:
        yield hp


@pytest.fixture
def smol(server: HotmodelProcess) -> HotmodelProcess:
    resp = httpx.post(server.base_url + "/admin/switch", json={"model": "smollm2"}, timeout=120)
    assert resp.status_code == 200, resp.text
    return server


def session_of(server: HotmodelProcess, session: str) -> dict[str, Any]:
    resp = httpx.get(server.base_url + f"/v1/sessions/{session}")
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def exact_tokens(server: HotmodelProcess, model: str, messages: list[dict[str, Any]]) -> int:
    """The prompt size as the model's own template and tokenizer see it."""
    router = server.status()["router"]
    assert isinstance(router, dict)
    url, auth = router["url"], server.router_auth()
    prompt = httpx.post(
        url + "/apply-template", json={"model": model, "messages": messages}, headers=auth
    ).json()["prompt"]
    tokens = httpx.post(
        url + "/tokenize",
        json={"model": model, "content": prompt, "add_special": True},
        headers=auth,
    ).json()["tokens"]
    return len(tokens)


def stored(server: HotmodelProcess, session: str) -> list[dict[str, Any]]:
    return [
        {"role": m["role"], "content": m["content"]}
        for m in session_of(server, session)["messages"]
    ]


def test_openai_client_with_session_plain_and_streaming(smol: HotmodelProcess) -> None:
    client = openai.OpenAI(base_url=smol.base_url + "/v1", api_key="unused")
    first = client.chat.completions.create(
        model="active",
        messages=[{"role": "user", "content": "My name is Ada."}],
        max_tokens=8,
        extra_body={"session_id": "oa-1"},
    )
    parts = []
    for chunk in client.chat.completions.create(
        model="active",
        messages=[{"role": "user", "content": "What is my name?"}],
        max_tokens=8,
        stream=True,
        extra_body={"session_id": "oa-1"},
    ):
        assert isinstance(chunk, ChatCompletionChunk)
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    history = session_of(smol, "oa-1")
    assert history["system_prompt"] == "brief"  # the configured default
    msgs = history["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[1]["content"] == first.choices[0].message.content
    assert msgs[3]["content"] == "".join(parts)  # assembled from the SSE deltas
    assert [m["model"] for m in msgs] == [None, "smollm2", None, "smollm2"]


def test_second_turn_gets_system_prompt_and_history_prepended(smol: HotmodelProcess) -> None:
    answer(chat(smol, session="hist-1", messages=[user("Remember the word banana.")], **GREEDY))
    reply = answer(chat(smol, session="hist-1", messages=[user("Which word?")], **GREEDY))
    expected = exact_tokens(
        smol, "smollm2", [{"role": "system", "content": BRIEF}, *stored(smol, "hist-1")[:3]]
    )
    assert reply["usage"]["prompt_tokens"] == expected
    assert reply["timings"]["cache_n"] > 0  # the shared prefix came from the prompt cache


def test_full_resend_is_not_stored_twice(smol: HotmodelProcess) -> None:
    r1 = answer(chat(smol, session="resend-1", messages=[user("One.")], **GREEDY))
    a1 = r1["choices"][0]["message"]["content"]
    answer(
        chat(
            smol,
            session="resend-1",
            messages=[
                {"role": "system", "content": "x"},
                user("One."),
                {"role": "assistant", "content": a1},
                user("Two."),
            ],
            **GREEDY,
        )
    )
    assert [m["content"] for m in stored(smol, "resend-1")][::2] == ["One.", "Two."]
    assert len(stored(smol, "resend-1")) == 4


def test_a_regenerated_or_edited_resend_replaces_the_end_of_the_session(
    smol: HotmodelProcess,
) -> None:
    """Found by a black-box pass: "regenerate" (the conversation up to the last question,
    sent again) stored the whole conversation a second time, and the model read it twice;
    so did a client whose copy of an answer was trimmed or sent as text parts."""
    one = answer(chat(smol, session="regen", messages=[user("One.")], **GREEDY))
    first = one["choices"][0]["message"]["content"]
    asked = [user("One."), {"role": "assistant", "content": first}, user("Two.")]
    second = answer(chat(smol, session="regen", messages=asked, **GREEDY))
    regenerate: dict[str, Any] = {"max_tokens": 8, "temperature": 1.0, "seed": 7}
    again = answer(chat(smol, session="regen", messages=asked, **regenerate))
    assert again["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]
    roles = [m["role"] for m in stored(smol, "regen")]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert stored(smol, "regen")[3]["content"] == again["choices"][0]["message"]["content"]
    # the answer as text parts with whitespace around it: the same message, nothing doubled
    parts = [{"type": "text", "text": f"  {first} "}]
    edited: list[dict[str, Any]] = [
        user("One."),
        {"role": "assistant", "content": parts},
        user("Three."),
    ]
    third = answer(chat(smol, session="regen", messages=edited, **GREEDY))
    assert [m["content"] for m in stored(smol, "regen")][::2] == ["One.", "Three."]
    assert third["usage"]["prompt_tokens"] < 2 * second["usage"]["prompt_tokens"] - 20


def session_stream(
    server: HotmodelProcess, session: str, messages: list[dict[str, Any]], **extra: Any
) -> contextlib.AbstractContextManager[httpx.Response]:
    """A streamed turn on ``session`` (read it inside the ``with``)."""
    return httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        json={"messages": messages, "stream": True, **extra},
        timeout=60,
        headers={"x-session-id": session},
    )


def test_a_trailing_assistant_message_is_continued_and_stored_once(
    smol: HotmodelProcess,
) -> None:
    """llama-server continues a trailing assistant message (a prefill) and answers with it
    whole: the answer replaces that message. Found by a black-box pass: a resend of the
    whole conversation, ending with the stored answer, stored a second answer in a row."""
    one = answer(chat(smol, session="prefill", messages=[user("One.")], **GREEDY))
    first = one["choices"][0]["message"]["content"]
    resent = answer(
        chat(
            smol,
            session="prefill",
            messages=[user("One."), {"role": "assistant", "content": first}],
            **GREEDY,
        )
    )
    continued = resent["choices"][0]["message"]["content"]
    assert continued.startswith(first.strip())
    assert [m["role"] for m in stored(smol, "prefill")] == ["user", "assistant"]
    assert stored(smol, "prefill")[1]["content"] == continued
    # a new turn that ends with the beginning of its answer, streamed
    prefilled = [user("Name a colour."), {"role": "assistant", "content": "A colour:"}]
    with session_stream(smol, "prefill", prefilled, max_tokens=6) as resp:
        assert resp.status_code == 200
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in resp.iter_lines()
            if line.startswith("data: {") and json.loads(line[6:]).get("choices")
        )
    assert text.startswith("A colour:")
    history = stored(smol, "prefill")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[3]["content"] == text
    # a prefill in text parts (llama-server joins them with a blank line), an empty one
    parts = [{"type": "text", "text": "The capital"}, {"type": "text", "text": " of Spain is"}]
    spain = answer(
        chat(
            smol,
            session="prefill",
            messages=[user("Capital of Spain?"), {"role": "assistant", "content": parts}],
            **GREEDY,
        )
    )
    empty = answer(
        chat(
            smol,
            session="prefill",
            messages=[user("Capital of Italy?"), {"role": "assistant", "content": ""}],
            **GREEDY,
        )
    )
    history = stored(smol, "prefill")
    assert [m["role"] for m in history] == ["user", "assistant"] * 4
    assert history[5]["content"] == spain["choices"][0]["message"]["content"]
    # without the empty message, the model's turn begins as usual (it wrote "assistant\n")
    assert history[7]["content"] == empty["choices"][0]["message"]["content"]
    assert not history[7]["content"].startswith("assistant")


def test_aborted_stream_adds_no_half_reply(smol: HotmodelProcess) -> None:
    answer(chat(smol, session="abort-1", messages=[user("Hello.")], **GREEDY))
    story = [user("Tell me a long story.")]
    with session_stream(smol, "abort-1", story, max_tokens=500, ignore_eos=True) as resp:
        lines = resp.iter_lines()
        assert sum(1 for _ in zip(range(6), lines, strict=False)) == 6
        resp.close()
    assert len(stored(smol, "abort-1")) == 2


def test_without_a_session_nothing_is_stored_or_changed(smol: HotmodelProcess) -> None:
    before = httpx.get(smol.base_url + "/v1/sessions").json()["data"]
    reply = answer(chat(smol, messages=[user("Hi")], **GREEDY))
    assert reply["usage"]["prompt_tokens"] == exact_tokens(smol, "smollm2", [user("Hi")])
    assert httpx.get(smol.base_url + "/v1/sessions").json()["data"] == before


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        ({"system_prompt": "brief"}, {}, "system_prompt"),  # it needs a session
        ({"session_id": "p-1", "system_prompt": "nope"}, {}, "system_prompt"),  # unknown
        ({"session_id": "p-2", "system_prompt": 3}, {}, "system_prompt"),
        ({"session_id": "p-3", "preset": "brief"}, {}, "preset"),  # renamed: says so
        ({"session_id": "p-4"}, {"x-preset": "brief"}, "x-preset"),
        ({"session_id": "x" * 200}, {}, "session_id"),
        ({"session_id": 5}, {}, "session_id"),
    ],
)
def test_bad_session_fields_are_400(
    smol: HotmodelProcess, body: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    resp = httpx.post(
        smol.base_url + "/v1/chat/completions",
        headers=headers,
        json={"messages": [user("x")], **body},
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_system_prompt_per_session_by_header(smol: HotmodelProcess) -> None:
    resp = httpx.post(
        smol.base_url + "/v1/chat/completions",
        timeout=60,
        headers={"x-session-id": "pirate-1", "x-system-prompt": "pirate"},
        json={"messages": [user("Hello")], "max_tokens": 4},
    )
    assert resp.status_code == 200
    assert resp.headers["x-session-id"] == "pirate-1"
    expected = exact_tokens(
        smol, "smollm2", [{"role": "system", "content": "Talk like a pirate."}, user("Hello")]
    )
    assert resp.json()["usage"]["prompt_tokens"] == expected
    assert session_of(smol, "pirate-1")["system_prompt"] == "pirate"


def test_conversation_continues_on_gemma_after_a_switch_and_a_restart(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    session = 'default_system_prompt = "brief"'
    with serving(tmp_path, real_models, session=session) as hp:
        answer(
            chat(hp, session="travel", messages=[user("I am planning a trip to Lisbon.")], **GREEDY)
        )
        answer(chat(hp, session="travel", messages=[user("I like old trams.")], **GREEDY))
        question = user("Which city did I name?")
        on_smollm2 = exact_tokens(
            hp, "smollm2", [{"role": "system", "content": BRIEF}, *stored(hp, "travel"), question]
        )
        report = httpx.post(
            hp.base_url + "/admin/switch", json={"model": "gemma3"}, timeout=120
        ).json()
        assert report["outcome"] == "ok"
        assert report["replay"]["session"] == "travel"
        assert report["replay"]["prompt_tokens"] > 0
        third = answer(chat(hp, session="travel", messages=[question], **GREEDY))
        assert third["model"] == "gemma3"
        sent = [{"role": "system", "content": BRIEF}, *stored(hp, "travel")[:5]]
        # Gemma received the system prompt and the whole history, in its own template:
        assert third["usage"]["prompt_tokens"] == exact_tokens(hp, "gemma3", sent)
        assert third["usage"]["prompt_tokens"] != on_smollm2  # another tokenizer
        assert third["timings"]["cache_n"] > 0  # the replay pre-filled it
    with serving(tmp_path, real_models, session=session) as again:  # same state folder
        kept = session_of(again, "travel")
        assert [m["model"] for m in kept["messages"]] == [
            None,
            "smollm2",
            None,
            "smollm2",
            None,
            "gemma3",
        ]
        fourth = answer(
            chat(again, session="travel", messages=[user("And what do I like?")], **GREEDY)
        )
        assert fourth["model"] == "smollm2"
        sent = [{"role": "system", "content": BRIEF}, *stored(again, "travel")[:7]]
        assert fourth["usage"]["prompt_tokens"] == exact_tokens(again, "smollm2", sent)


def test_token_budget_holds_for_both_tokenizers(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    budget = 220
    with serving(
        tmp_path, real_models, session=f'max_prompt_tokens = {budget}\ntoken_count_mode = "auto"'
    ) as hp:
        turn = (
            "Here is a detail about my garden: the roses by the north wall bloom late "
            "this year, number {}."
        )
        calls_before = hp.status()["sessions"]["token_calls"]  # type: ignore[index]
        sizes = []
        for i in range(8):
            reply = answer(
                chat(
                    hp,
                    session="garden",
                    messages=[user(turn.format(i))],
                    max_tokens=4,
                    temperature=0,
                )
            )
            sizes.append(reply["usage"]["prompt_tokens"])
            assert reply["usage"]["prompt_tokens"] <= budget
        assert len(stored(hp, "garden")) == 16  # the session keeps everything
        assert sizes[-1] < exact_tokens(hp, "smollm2", stored(hp, "garden")[:15])  # trimmed
        calls = hp.status()["sessions"]["token_calls"] - calls_before  # type: ignore[index]
        assert 0 < calls <= 8 * (2 + math.ceil(math.log2(16)))  # binary search, not 1 per turn
        httpx.post(hp.base_url + "/admin/switch", json={"model": "gemma3"}, timeout=120)
        on_gemma = answer(
            chat(
                hp, session="garden", messages=[user(turn.format(99))], max_tokens=4, temperature=0
            )
        )
        assert on_gemma["model"] == "gemma3"
        assert on_gemma["usage"]["prompt_tokens"] <= budget


def test_auto_mode_makes_no_tokenizer_call_far_under_budget(smol: HotmodelProcess) -> None:
    before = smol.status()["sessions"]["token_calls"]  # type: ignore[index]
    answer(chat(smol, session="short-1", messages=[user("Hi")], **GREEDY))
    answer(chat(smol, session="short-1", messages=[user("Bye")], **GREEDY))
    assert smol.status()["sessions"]["token_calls"] == before  # type: ignore[index]


def test_replay_fills_the_prompt_cache_for_the_first_turn_after_a_switch(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    results = {}
    for on in (True, False):  # [switch] replay_session
        config = f"replay_session = {str(on).lower()}"
        with serving(tmp_path / f"replay-{on}", real_models, extra=config) as hp:
            for text in ("I collect stamps from Iceland.", "My favourite one is blue."):
                answer(chat(hp, session="stamps", messages=[user(text)], **GREEDY))
            report = httpx.post(
                hp.base_url + "/admin/switch", json={"model": "gemma3"}, timeout=120
            ).json()
            assert (report["replay"] is not None) is on
            results[on] = answer(
                chat(hp, session="stamps", messages=[user("What do I collect?")], **GREEDY)
            )["timings"]
    assert results[True]["cache_n"] > 0
    assert results[False]["cache_n"] == 0
    # same prompt, far fewer tokens to evaluate on the first turn after the switch
    assert results[True]["prompt_n"] < results[False]["prompt_n"]
    assert results[True]["prompt_n"] + results[True]["cache_n"] == results[False]["prompt_n"]


def test_session_api_and_cli(smol: HotmodelProcess) -> None:
    answer(chat(smol, session="api-1", messages=[user("Hello")], **GREEDY))
    listed = httpx.get(smol.base_url + "/v1/sessions").json()["data"]
    assert listed[0]["id"] == "api-1" and listed[0]["messages"] == 2
    out = run_hotmodel("sessions", "list", "--config", str(smol.config))
    assert out.returncode == 0 and "api-1  2 message(s)  system prompt: brief" in out.stdout
    shown = run_hotmodel("sessions", "show", "api-1", "--config", str(smol.config), "--json")
    assert '"content": "Hello"' in shown.stdout
    readable = run_hotmodel("sessions", "show", "api-1", "--config", str(smol.config))
    assert "] user: Hello" in readable.stdout and "] assistant (smollm2): " in readable.stdout
    deleted = run_hotmodel("sessions", "delete", "api-1", "--config", str(smol.config))
    assert deleted.returncode == 0
    assert httpx.get(smol.base_url + "/v1/sessions/api-1").status_code == 404
    gone = run_hotmodel("sessions", "show", "api-1", "--config", str(smol.config))
    assert gone.returncode == 1 and "no session 'api-1'" in gone.stderr
    missing = httpx.delete(smol.base_url + "/v1/sessions/api-1")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "session_not_found"
    # an id no session can have: the same 400 from GET and DELETE
    for bad in ("h%C3%A9llo", "a%20b", "x" * 129, ""):
        for method in ("GET", "DELETE"):
            resp = httpx.request(method, smol.base_url + "/v1/sessions/" + bad)
            assert resp.status_code == 400, (method, bad, resp.text)
            assert resp.json()["error"]["param"] == "session_id"
