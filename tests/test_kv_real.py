"""Per-session KV snapshots against the real router and models: switching back and
restarting restore the conversation's KV (proven by ``cache_n``); snapshots from a
changed GGUF, other settings or a damaged file are refused and replay is used."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    HotmodelProcess,
    answer,
    chat,
    last_switch,
    start_hotmodel,
    switched,
    user,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow  # drives the real llama-server

FACTS = " ".join(f"item{i} is on shelf {i % 17}." for i in range(50))  # ~450 tokens


def streamed(hp: HotmodelProcess, text: str, session: str = "kv") -> dict[str, Any]:
    """A streamed turn, read to its end; its final ``timings``."""
    body = {
        "messages": [user(text)],
        "max_tokens": 4,
        "session_id": session,
        "stream": True,
    }
    timings: dict[str, Any] = {}
    with httpx.stream("POST", hp.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                timings = json.loads(line[6:]).get("timings") or timings
    return timings


def assert_proven(hp: HotmodelProcess, tokens: int) -> None:
    """The last restore was proven by the turn after it (its record closed after the
    stream's last event: waited for), at least ``tokens`` of it read from the cache."""
    proven = wait_until(
        "the restore's proof",
        lambda: (found := last_switch(hp)["snapshot"]["restore"])["took"] is not None and found,
    )
    assert proven["took"] is True and proven["cache_tokens"] >= tokens, proven


def kv_config(folder: Path, models: dict[str, Path], extra: str = "", router: str = "") -> Path:
    return write_config(
        folder,
        {"smollm2": models["smollm2"], "gemma3": models["gemma3"]},
        "smollm2",
        extra="kv_snapshots = true\n" + extra,
        router=router,
    )


def test_switching_back_and_restarting_restore_the_conversation(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    config = kv_config(tmp_path, real_models)
    hp = start_hotmodel(config)
    try:
        first = answer(chat(hp, messages=[user(FACTS)], session_id="kv"))
        assert first["timings"]["cache_n"] == 0
        away = switched(hp, "gemma3")
        saved = away["snapshot"]["save"]
        assert saved["session"] == "kv" and saved["tokens"] > 400 and saved["bytes"] > 0
        back = switched(hp, "smollm2")
        restore = back["snapshot"]["restore"]
        assert restore["restored"] is True and restore["tokens"] == saved["tokens"], back
        assert restore["took"] is None  # not known before a request shows its cache_n
        assert back["replay"] is None  # nothing re-read: the next turn reads what is new
        # away and back again with no turn between: the snapshots are kept, not rewritten
        twice = switched(hp, "gemma3")
        assert twice["snapshot"]["save"]["saved"] is False, twice
        assert "unchanged since its restore" in twice["snapshot"]["save"]["reason"]
        assert twice["snapshot"]["restore"]["restored"] is True  # Gemma's, saved on the way
        back = switched(hp, "smollm2")
        assert "unchanged" in back["snapshot"]["save"]["reason"]
        assert back["snapshot"]["restore"]["tokens"] == saved["tokens"], back
        nxt = streamed(hp, "Which shelf is item7 on?")
        assert nxt["cache_n"] >= saved["tokens"]
        assert nxt["prompt_n"] < 40  # only the new turn was read
        # proven by then: the stream ends after its proof is recorded
        proven = last_switch(hp)["snapshot"]["restore"]
        assert proven["took"] is True and proven["cache_tokens"] >= saved["tokens"], proven
        status = hp.status()["kv_snapshots"]
        assert isinstance(status, dict) and status["count"] == 2 and status["bytes"] > 0
    finally:
        assert hp.stop() == 0, hp.output()
    assert "kept the KV of session 'kv'" in hp.output()  # saved at stop
    again = start_hotmodel(config)
    try:
        start = httpx.get(again.base_url + "/admin/switches").json()["data"][-1]
        assert start["to"] == "smollm2" and start["snapshot"]["restore"]["restored"] is True
        after = answer(chat(again, messages=[user("And item9?")], session_id="kv"))
        assert after["timings"]["cache_n"] > 400  # the first turn after a restart hit the cache
        assert after["timings"]["prompt_n"] < 40
        assert last_switch(again)["snapshot"]["restore"]["took"] is True
    finally:
        assert again.stop() == 0, again.output()


def test_changed_model_or_damaged_files_are_refused_and_replay_is_used(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    models = tmp_path / "m"
    models.mkdir()
    local = {k: Path(shutil.copy(v, models / v.name)) for k, v in real_models.items()}
    hp = start_hotmodel(kv_config(tmp_path, local))
    kv_dir = tmp_path / "state" / "kv"
    try:
        router_pid = hp.status()["router"]["pid"]  # type: ignore[index]
        answer(chat(hp, messages=[user(FACTS)], session_id="kv"))
        switched(hp, "gemma3")
        # a damaged snapshot (same size, other bytes) is never handed to llama-server
        (snap,) = [p for p in kv_dir.glob("kv-*.bin")]
        data = bytearray(snap.read_bytes())
        data[len(data) // 2] ^= 0xFF
        snap.write_bytes(bytes(data))
        back = switched(hp, "smollm2")
        assert back["snapshot"]["restore"] == {
            "restored": False,
            "reason": "snapshot refused: its file is truncated or corrupted",
        }
        assert back["replay"]["cache_tokens"] == 0 and back["replay"]["prompt_tokens"] > 400
        nxt = answer(chat(hp, messages=[user("Which shelf is item7 on?")], session_id="kv"))
        assert nxt["timings"]["cache_n"] > 400
        # the model file changes while its snapshot waits: refused, and deleted
        switched(hp, "gemma3")
        os.utime(local["smollm2"], None)
        os.utime(local["smollm2"], (1, 1))
        back = switched(hp, "smollm2")
        assert back["snapshot"]["restore"]["reason"] == "snapshot refused: model file changed"
        assert back["replay"]["prompt_tokens"] > 400
        # a truncated snapshot: refused too; llama-server and hotmodel are unharmed
        switched(hp, "gemma3")
        gemma_snaps = sorted(kv_dir.glob("kv-*.bin"), key=lambda p: p.stat().st_mtime)
        newest = gemma_snaps[-1]
        newest.write_bytes(newest.read_bytes()[:1000])
        back = switched(hp, "smollm2")
        assert "truncated or corrupted" in back["snapshot"]["restore"]["reason"]
        assert hp.status()["router"]["pid"] == router_pid  # type: ignore[index]
        nxt = answer(chat(hp, messages=[user("And item9?")], session_id="kv"))
        assert nxt["timings"]["cache_n"] > 400
    finally:
        assert hp.stop() == 0, hp.output()


def test_budget_settings_and_session_deletion(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    config = kv_config(tmp_path, real_models)
    hp = start_hotmodel(config)
    try:
        answer(chat(hp, messages=[user(FACTS)], session_id="kv"))
        switched(hp, "gemma3")
        switched(hp, "smollm2")  # saves gemma3's slot too: two snapshots
        status = hp.status()["kv_snapshots"]
        assert isinstance(status, dict) and status["count"] == 2
        assert httpx.delete(hp.base_url + "/v1/sessions/kv").status_code == 200
        status = hp.status()["kv_snapshots"]
        assert isinstance(status, dict) and status["count"] == 0  # its KV went with it
        answer(chat(hp, messages=[user(FACTS)], session_id="again"))
    finally:
        assert hp.stop() == 0, hp.output()
    # another KV cache type: the snapshot kept at stop no longer fits, dropped at start
    kv_config(tmp_path, real_models, router='cache_type_k = "q8_0"')
    again = start_hotmodel(config)
    try:
        start = httpx.get(again.base_url + "/admin/switches").json()["data"][-1]
        assert start["snapshot"]["restore"]["restored"] is False
        assert "KV settings changed" in again.output()
    finally:
        assert again.stop() == 0, again.output()
    # a snapshot larger than the whole budget is not kept, and evicts nothing
    kv_config(tmp_path, real_models, extra="kv_snapshot_max_bytes = 1000")
    small = start_hotmodel(config)
    try:
        answer(chat(small, messages=[user(FACTS)], session_id="third"))
        saved = switched(small, "gemma3")["snapshot"]["save"]
        assert saved["saved"] is False and saved["kept"] is False and saved["evicted"] == []
        assert "more than [switch] kv_snapshot_max_bytes = 1000" in saved["reason"], saved
        status = small.status()["kv_snapshots"]
        assert isinstance(status, dict) and status["count"] == 0
    finally:
        assert small.stop() == 0, small.output()


def test_a_tight_budget_keeps_the_snapshot_switched_back_to_and_a_reload_lowers_it(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    """Found by a hostile pass: with room for one snapshot, switching a -> b -> a saved b's
    by deleting a's, then replayed a's conversation in full; and a lowered budget waited
    for the next save."""
    config = kv_config(tmp_path, real_models)
    hp = start_hotmodel(config)
    try:
        answer(chat(hp, messages=[user(FACTS)], session_id="kv"))
        first = switched(hp, "gemma3")["snapshot"]["save"]  # smollm2's
        assert first["kept"] is True and first["evicted"] == [], first
        second = switched(hp, "smollm2")["snapshot"]["save"]  # gemma3's
        sizes = (first["bytes"], second["bytes"])
        limit = max(sizes) + min(sizes) // 2  # room for either (a few turns more), not both
        kv_config(tmp_path, real_models, extra=f"kv_snapshot_max_bytes = {limit}")
        reloaded = httpx.post(hp.base_url + "/admin/reload", timeout=60).json()
        assert "switch.kv_snapshot_max_bytes" in reloaded["applied"], reloaded
        status = hp.status()["kv_snapshots"]
        assert isinstance(status, dict) and status["count"] == 1  # at once, not at a save
        assert f"over [switch] kv_snapshot_max_bytes = {limit}" in hp.output()
        # smollm2's slot moves on
        answer(chat(hp, messages=[user("Which shelf is item7 on?")], session_id="kv"))
        away = switched(hp, "gemma3")  # gemma3's snapshot went at the reload: it replays
        assert away["snapshot"]["save"]["kept"] is True, away
        back = switched(hp, "smollm2")
        saved, restore = back["snapshot"]["save"], back["snapshot"]["restore"]
        assert saved["kept"] is False and saved["evicted"] == [], saved
        assert "the snapshot restored next (smollm2, session 'kv')" in saved["reason"]
        assert restore["restored"] is True, back
        nxt = answer(chat(hp, messages=[user("And item9?")], session_id="kv"))
        assert nxt["timings"]["cache_n"] > 400 and nxt["timings"]["prompt_n"] < 40
    finally:
        assert hp.stop() == 0, hp.output()


def test_gemma_is_not_saved_again_once_its_restore_did_not_take_and_a_lost_folder_is_made(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    """Found by a hostile pass: Gemma 3's restores never take here (sliding-window
    attention keeps too little; llama-server re-reads the prompt), yet a multi-MB snapshot
    was written at every switch; and with the snapshot folder deleted, no model loaded."""
    config = kv_config(tmp_path, real_models)
    hp = start_hotmodel(config)
    try:
        switched(hp, "gemma3")
        answer(chat(hp, messages=[user("Name a colour.")], session_id="g"))
        switched(hp, "smollm2")  # Gemma's slot is saved
        back = switched(hp, "gemma3")
        assert back["snapshot"]["restore"]["restored"] is True, back
        # llama-server read it all again
        answer(chat(hp, messages=[user("And another?")], session_id="g"))
        restore = last_switch(hp)["snapshot"]["restore"]
        assert restore["took"] is False and "did not take" in restore["reason"], restore
        again = switched(hp, "smollm2")
        assert again["snapshot"]["save"]["saved"] is False
        assert "did not take" in again["snapshot"]["save"]["reason"]
        assert "save" not in again["phases"]  # a skipped phase
        shutil.rmtree(tmp_path / "state" / "kv")
        switched(hp, "gemma3")  # the folder is made again before the load
        last = answer(chat(hp, messages=[user("And one more?")], session_id="g"))
        assert last["model"] == "gemma3"
    finally:
        assert hp.stop() == 0, hp.output()


def test_an_auto_switch_restores_the_conversation_of_the_request_that_caused_it(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    """Found by a hostile pass: with two clients, a request that switched back restored (or
    replayed) the most recently used session, another client's, not its own."""
    hp = start_hotmodel(kv_config(tmp_path, real_models, extra="auto = true"))

    def turn(session: str, model: str, text: str) -> dict[str, Any]:
        resp = httpx.post(
            hp.base_url + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": text}],
                  "max_tokens": 4, "session_id": session},
            timeout=300,
        )  # fmt: skip
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data

    try:
        turn("p", "smollm2", FACTS)
        turn("q", "gemma3", "Name a colour.")  # switches away; q is now the most recent
        back = turn("p", "smollm2", "Which shelf is item7 on?")  # switches back, for p
        report = last_switch(hp)
        assert report["to"] == "smollm2" and report["snapshot"]["restore"]["session"] == "p"
        assert report["snapshot"]["restore"]["took"] is True, report
        assert back["timings"]["cache_n"] > 400  # p's conversation was not read again
    finally:
        assert hp.stop() == 0, hp.output()


def test_a_failed_switch_loads_the_previous_model_again_with_its_conversation(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    """The previous model was unloaded (no background exit: the load waits for it), the
    next one's file passes the GGUF check but does not load: the rollback loads the
    previous model again and restores the snapshot saved on its way out."""
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\xff" * 64)
    config = write_config(
        tmp_path,
        {"smollm2": real_models["smollm2"], "broken": damaged},
        "smollm2",
        extra="kv_snapshots = true\nbackground_exit = false",
    )
    hp = start_hotmodel(config)
    try:
        answer(chat(hp, messages=[user(FACTS)], session_id="kv"))
        failed = httpx.post(hp.base_url + "/admin/switch", json={"model": "broken"}, timeout=300)
        assert failed.status_code == 502, failed.text
        report = failed.json()
        assert report["rolled_back"] is True and report["active_after"] == "smollm2", report
        back = report["snapshot"]["rollback_restore"]
        assert back["restored"] is True and back["tokens"] > 400, report
        nxt = answer(chat(hp, messages=[user("Which shelf is item7 on?")], session_id="kv"))
        assert nxt["timings"]["cache_n"] > 400  # the conversation was not read again
        assert last_switch(hp)["snapshot"]["rollback_restore"]["took"] is True
    finally:
        assert hp.stop() == 0, hp.output()


def test_a_responses_chain_and_an_anthropic_session_are_restored_after_a_switch_back(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    """A Responses chain (``previous_response_id``) is a session at a switch: its KV is
    saved on the way out and restored on the way back, and its next turn (plain, then
    streamed) reads only what is new and proves the restore. An Anthropic Messages session
    (``X-Session-Id``) likewise, its streamed turn proving it (its counts: the first
    event's)."""
    hp = start_hotmodel(kv_config(tmp_path, real_models))
    url = hp.base_url + "/v1/responses"
    greedy = {"temperature": 0, "max_output_tokens": 4}
    try:
        first = httpx.post(url, json={"input": FACTS, **greedy}, timeout=120).json()
        chain = f"responses {first['id']}"
        saved = switched(hp, "gemma3")["snapshot"]["save"]
        assert saved["session"] == chain and saved["tokens"] > 400, saved
        back = switched(hp, "smollm2")
        assert back["snapshot"]["restore"]["restored"] is True, back
        assert back["snapshot"]["restore"]["session"] == chain and back["replay"] is None
        body = {"input": "Which shelf is item7 on?", "previous_response_id": first["id"]}
        second = httpx.post(url, json={**body, **greedy}, timeout=120).json()
        usage = second["usage"]
        assert usage["input_tokens_details"]["cached_tokens"] >= saved["tokens"], usage
        assert usage["input_tokens"] - usage["input_tokens_details"]["cached_tokens"] < 40
        proven = last_switch(hp)["snapshot"]["restore"]
        assert proven["took"] is True and proven["cache_tokens"] >= saved["tokens"], proven
        # once more, streamed: the chain's session now holds both turns
        saved = switched(hp, "gemma3")["snapshot"]["save"]
        assert saved["session"] == chain and saved["tokens"] > 400, saved
        assert switched(hp, "smollm2")["snapshot"]["restore"]["restored"] is True
        body = {"input": "And item9?", "previous_response_id": second["id"], "stream": True}
        with httpx.stream("POST", url, json={**body, **greedy}, timeout=120) as r:
            assert r.status_code == 200
            lines = list(r.iter_lines())  # read to its end: the proof follows the last event
        assert any("response.completed" in line for line in lines)
        assert_proven(hp, saved["tokens"])
        stored = httpx.get(f"{hp.base_url}/v1/sessions/responses%20{first['id']}").json()
        assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * 3

        # an Anthropic Messages session, its next turn streamed
        head = {"x-session-id": "anthropic-kv"}
        turn = {"model": "smollm2", "max_tokens": 4, "temperature": 0}
        said = [{"role": "user", "content": FACTS}]
        answer = httpx.post(
            hp.base_url + "/v1/messages", json={**turn, "messages": said}, headers=head, timeout=120
        )
        assert answer.status_code == 200, answer.text
        saved = switched(hp, "gemma3")["snapshot"]["save"]
        assert saved["session"] == "anthropic-kv" and saved["tokens"] > 400, saved
        assert switched(hp, "smollm2")["snapshot"]["restore"]["restored"] is True
        said = [{"role": "user", "content": "Which shelf is item3 on?"}]
        body = {**turn, "messages": said, "stream": True}
        with httpx.stream(
            "POST", hp.base_url + "/v1/messages", json=body, headers=head, timeout=120
        ) as r:
            assert r.status_code == 200
            lines = list(r.iter_lines())  # read to its end: the proof follows the last event
        assert any("message_stop" in line for line in lines)
        assert_proven(hp, saved["tokens"])

        def cached_total() -> float:
            metrics = httpx.get(hp.base_url + "/metrics", timeout=10).text
            cached = [
                line for line in metrics.splitlines()
                if line.startswith('hotmodel_prompt_cached_tokens_total{model="smollm2"}')
            ]  # fmt: skip
            return float(cached[0].split()[-1]) if cached else 0.0

        # three restored turns (the last one's counted once its record is closed)
        wait_until("the cached tokens counted", lambda: cached_total() >= 3 * 400)
    finally:
        assert hp.stop() == 0, hp.output()
