"""KV snapshot validity and labels, without a router: what makes a snapshot refused."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from hotmodel.config import load_config
from hotmodel.control import snapshot_folder, snapshot_proof
from hotmodel.control.snapshots import Digests, Snapshots, identity
from hotmodel.sessions.service import SessionRef
from hotmodel.sessions.slots import SlotLedger, messages_hash
from tests.conftest import write_config


def test_identity_changes_with_the_model_file_the_binary_and_kv_settings(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 4096)
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"binary")
    config = load_config(write_config(tmp_path, {"m": model}, "m", extra="kv_snapshots = true"))
    base = identity(config, binary, "m")
    assert set(base) == {"model file", "llama-server binary", "KV settings"}
    assert identity(config, binary, "m") == base  # stable

    other_binary = tmp_path / "other-llama-server"
    shutil.copy2(binary, other_binary)
    assert identity(config, other_binary, "m")["llama-server binary"] != base["llama-server binary"]

    os.utime(model, (1, 1))  # same bytes, another mtime: the file may have been replaced
    assert identity(config, binary, "m")["model file"] != base["model file"]

    other = load_config(
        write_config(
            tmp_path, {"m": model}, "m", extra="kv_snapshots = true", router='cache_type_v = "q8_0"'
        )
    )
    changed = identity(other, binary, "m")
    assert changed["KV settings"] != base["KV settings"]


def test_the_ledger_labels_what_a_slot_holds() -> None:
    ledger = SlotLedger()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    gen = ledger.touch("m")
    ledger.cover("m", gen, "owner", "s1", messages)
    covered = ledger.get("m")
    assert covered is not None and covered.n_messages == 2
    assert covered.messages_hash == messages_hash(messages)
    assert messages_hash(messages[:1]) != covered.messages_hash
    ledger.touch("m")  # a request without a session: the slot is nobody's now
    assert ledger.get("m") is None and ledger.get("never") is None
    # a session turn overtaken by another request on the same model labels nothing
    turn = ledger.touch("m")
    ledger.touch("m")
    ledger.cover("m", turn, "owner", "s1", messages)
    assert ledger.get("m") is None
    # a deleted session's label is dropped
    gen = ledger.touch("m")
    ledger.cover("m", gen, "owner", "s1", messages)
    ledger.forget("owner", "s1")
    assert ledger.get("m") is None


def test_a_digest_is_remembered_only_while_its_file_is_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = tmp_path / "kv-1.bin"
    snap.write_bytes(b"a" * 4096)
    digests = Digests()
    reads: list[Path] = []
    real = snapshot_folder._sha256

    def counting(path: Path) -> str:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(snapshot_folder, "_sha256", counting)

    def of() -> str:
        return asyncio.run(digests.of(snap))

    assert of() == hashlib.sha256(b"a" * 4096).hexdigest()
    assert of() == hashlib.sha256(b"a" * 4096).hexdigest()
    assert len(reads) == 1  # untouched: not read again
    # a same-size overwrite with the old mtime put back: ctime still moved, so it is read again
    st = snap.stat()
    snap.write_bytes(b"b" * 4096)
    os.utime(snap, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert of() == hashlib.sha256(b"b" * 4096).hexdigest()
    with snap.open("r+b") as f:  # truncated
        f.truncate(10)
    assert of() == hashlib.sha256(b"b" * 10).hexdigest()
    assert len(reads) == 3
    digests.forget(snap)
    snap.unlink()
    try:
        of()
    except OSError:
        pass
    else:
        raise AssertionError("a missing file has no digest")


def _store(tmp_path: Path, models: tuple[str, ...] = ("m",), extra: str = "") -> Snapshots:
    files = {name: tmp_path / f"{name}.gguf" for name in models}
    for file in files.values():
        file.write_bytes(b"GGUF" + b"\0" * 64)
    extra = "kv_snapshots = true\n" + extra
    config = load_config(write_config(tmp_path, files, models[0], extra=extra))
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"binary")
    # the router client and the session service are not reached by what is tested here
    return Snapshots(config, binary, cast(Any, None), cast(Any, None), SlotLedger())


def test_only_hotmodels_own_sidecars_are_read(tmp_path: Path) -> None:
    """A sidecar that names another file (a path outside the folder, too) is not hotmodel's:
    it is deleted, never counted, and the file it names is not touched."""
    store = _store(tmp_path)
    store.ensure_folder()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    good = {
        "file": "kv-0123456789abcdef.bin", "model": "m", "owner": "", "session_id": "s",
        "n_messages": 2, "messages_hash": "h", "identity": {}, "size": 3, "sha256": "x",
        "tokens": 1, "created": 1.0, "used": 1.0,
    }  # fmt: skip
    (store.dir / "kv-0123456789abcdef.json").write_text(json.dumps(good))
    (store.dir / "kv-0123456789abcdef.bin").write_bytes(b"abc")
    (store.dir / "kv-evil.json").write_text(json.dumps({**good, "file": "../victim.txt"}))
    (store.dir / "kv-fedcba9876543210.json").write_text(json.dumps({**good, "size": 10**9}))
    assert store.stats() == {"count": 1, "bytes": 3}
    assert sorted(p.name for p in store.dir.iterdir()) == [
        "kv-0123456789abcdef.bin",
        "kv-0123456789abcdef.json",
    ]
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize(
    "garbage",
    ["not json", "[]", '{"file": "kv-00000000000000cd.bin"}', '{"file": "kv-0000', "\u00ff\u0000"],
)
def test_a_garbage_sidecar_is_deleted_with_its_snapshot_and_never_counted(
    tmp_path: Path, garbage: str
) -> None:
    store = _store(tmp_path)
    store.ensure_folder()
    (store.dir / "kv-00000000000000cd.json").write_text(garbage)
    (store.dir / "kv-00000000000000cd.bin").write_bytes(b"x" * 100)
    assert store.stats() == {"count": 0, "bytes": 0}
    assert not store.has("m", "", "s")
    assert list(store.dir.iterdir()) == []


def test_a_snapshot_whose_sidecar_was_lost_does_not_escape_the_budget(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.ensure_folder()
    orphan = store.dir / "kv-00000000000000aa.bin"
    orphan.write_bytes(b"x" * 100)
    store.apply_budget()  # what start, a reload and every save do
    assert not orphan.exists()


def test_a_deleted_folder_is_made_again_before_a_load(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.ensure_folder()
    shutil.rmtree(store.dir)
    store.ensure_folder()  # llama-server refuses to start with a --slot-save-path that is gone
    assert store.dir.is_dir()


HELD = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]
NEXT = [*HELD, {"role": "user", "content": "And?"}]  # the session's next turn, as sent


def _restored(store: Snapshots, tokens: int = 100) -> tuple[Path, dict[str, Any]]:
    """As if ``tokens`` of session ("", "s") (the messages HELD) had just been restored
    into model "m"."""
    store.ensure_folder()
    path = store.dir / "kv-00000000000000ab.bin"
    path.write_bytes(b"kv")
    meta = snapshot_folder.Meta(
        path.name, "m", "", "s", 2, messages_hash(HELD), {}, 2, "d", tokens, time.time(), 0
    )
    store.folder.write(meta)
    info: dict[str, Any] = {"restored": True, "session": "s", "tokens": tokens, "took": None}
    gen = store.ledger.touch("m")
    covered = store.ledger.cover("m", gen, "", "s", HELD)
    store.proofs.unproved["m"] = snapshot_proof.Unproved(meta, info, gen, covered)
    return path, info


def _turn(store: Snapshots, cached: int, **change: Any) -> snapshot_proof.Turn:
    """The next request on "m": session s's next turn unless ``change`` says otherwise."""
    gen = store.ledger.touch("m")
    fields: dict[str, Any] = {"session": ("", "s"), "sent": NEXT, "cached": cached} | change
    return snapshot_proof.Turn("m", gen, **fields)


def test_the_sessions_next_turn_proves_a_restore(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path, info = _restored(store)
    store.turn_ended(_turn(store, 100))
    assert info["took"] is True and info["cache_tokens"] == 100 and path.exists()
    store.turn_ended(_turn(store, 0))  # only the first request after it proves anything
    assert info["took"] is True and path.exists()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"session": ("", "other")}, "not this session's"),
        ({"session": None, "sent": None}, "not this session's"),
        ({"cache_prompt": False}, "cache_prompt: false"),
        ({"sent": [{"role": "system", "content": "Be a pirate."}, *NEXT]}, "no longer begins"),
        ({"sent": NEXT[1:]}, "no longer begins"),  # trimmed
    ],
)
def test_a_request_that_cannot_tell_leaves_the_verdict_unknown(
    tmp_path: Path, change: dict[str, Any], why: str
) -> None:
    """A low cache_n from any of these says nothing about the restore: never a false
    "did not take" (which would delete the snapshot and stop saving that model)."""
    store = _store(tmp_path)
    path, info = _restored(store)
    store.turn_ended(_turn(store, 0, **change))
    assert info["took"] is None and why in info["unchecked"], info
    assert path.exists() and "m" not in store.proofs.no_take


def test_a_turn_with_another_request_on_the_slot_around_it_cannot_tell(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path, info = _restored(store)
    lost = store.ledger.touch("m")  # a request that never ended with an answer (it broke)
    assert lost
    store.turn_ended(_turn(store, 0))
    assert info["took"] is None and "another request" in info["unchecked"]
    # ... and one that started after the turn but before it ended
    path, info = _restored(store)
    turn = _turn(store, 0)
    store.ledger.touch("m")
    store.turn_ended(turn)
    assert info["took"] is None and "another request" in info["unchecked"]
    assert path.exists()


def test_a_model_whose_restore_did_not_take_is_not_saved_again(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path, info = _restored(store, tokens=500)
    store.turn_ended(_turn(store, 3))  # the turn found 3 of 500 tokens in the cache
    assert info["took"] is False and "cache_n 3 of 500" in info["reason"]
    assert not path.exists() and store.stats()["count"] == 0
    gen = store.ledger.touch("m")
    store.ledger.cover("m", gen, "", "s", [{"role": "user", "content": "hi"}])
    saved = asyncio.run(store.save("m"))
    assert saved is not None and saved["saved"] is False
    assert "did not take" in saved["reason"] and "--swa-full" in saved["reason"]


def test_a_model_that_leaves_has_nothing_left_to_prove(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path, info = _restored(store)
    store.ledger.touch("m")  # a request that was not a session's turn
    assert asyncio.run(store.save("m")) is None  # unloaded (its slot held no session)
    assert store.proved("m", 0, "s") is None and info["took"] is None and path.exists()


def test_a_replay_of_another_session_cannot_tell(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path, info = _restored(store)
    assert store.proved("m", 0, "other") is None and "another session's" in info["unchecked"]
    assert path.exists()


def test_a_slot_untouched_since_its_restore_is_not_saved_again(tmp_path: Path) -> None:
    """Switching away and back with no turn in between: the snapshot on disk still holds
    what the slot holds, so it is kept rather than written again."""
    store = _store(tmp_path)
    path, _ = _restored(store)
    kept = asyncio.run(store.save("m"))  # the client is never reached
    assert kept is not None and kept["saved"] is False and "unchanged" in kept["reason"]
    assert path.exists() and store.stats()["count"] == 1


class _SavingClient:
    """llama-server's slot save, as far as the snapshot store sees it: the file appears."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls: list[str] = []

    async def slot(self, model: str, action: str, filename: str, timeout: float) -> dict[str, int]:
        self.calls.append(action)
        (self.folder / filename).write_bytes(b"fresh kv")
        return {"n_saved": 40}


def test_a_restored_snapshot_whose_file_went_is_saved_anew(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path, _ = _restored(store)
    path.unlink()  # deleted from outside since its restore
    client = _SavingClient(store.dir)
    store.client = cast(Any, client)
    store.sessions = cast(Any, SimpleNamespace(store=SimpleNamespace(get=_any_session)))
    saved = asyncio.run(store.save("m"))
    assert client.calls == ["save"] and saved is not None and saved["tokens"] == 40
    assert store.stats() == {"count": 1, "bytes": len(b"fresh kv")}


async def _any_session(owner: str, session_id: str) -> object:
    return object()  # the session still exists


# --- the budget ([switch] kv_snapshot_max_bytes) ---


def _budgeted(tmp_path: Path, limit: int) -> Snapshots:
    """Models "a" and "b" under a budget of ``limit`` bytes; every save writes 8 bytes, and
    session ("", "s") is the most recently used one."""
    store = _store(tmp_path, ("a", "b"), f"kv_snapshot_max_bytes = {limit}")
    store.ensure_folder()
    store.client = cast(Any, _SavingClient(store.dir))

    async def most_recent(last: int | None = None) -> object:
        return SimpleNamespace(owner="", id="s")

    found = SimpleNamespace(get=_any_session, most_recent=most_recent)
    store.sessions = cast(Any, SimpleNamespace(store=found))
    return store


def _snap(store: Snapshots, model: str, session: str, used: float, size: int = 8) -> Path:
    """A valid snapshot of ``session``'s messages HELD in ``model``, last used at ``used``."""
    path = store.dir / f"kv-{os.urandom(8).hex()}.bin"
    path.write_bytes(b"k" * size)
    ident = identity(store.config, store.binary, model)
    meta = snapshot_folder.Meta(
        path.name, model, "", session, 2, messages_hash(HELD), ident, size, "d", 10, used, used
    )
    store.folder.write(meta)
    return path


def _save(
    store: Snapshots, model: str, restoring: str | None, session: SessionRef | None = None
) -> dict[str, Any]:
    """Switch away from ``model``, whose slot holds session s, to ``restoring`` (for
    ``session``'s conversation, else the most recent one)."""
    store.ledger.cover(model, store.ledger.touch(model), "", "s", HELD)
    info = asyncio.run(store.save(model, restoring, session))
    assert info is not None
    return info


def _held(store: Snapshots) -> list[tuple[str, str]]:
    return sorted((m.model, m.session_id) for m in store.folder.metas())


def test_the_snapshot_restored_next_is_never_evicted_to_make_room(tmp_path: Path) -> None:
    """Room for one: switching a -> b -> a, b's save gives way to a's snapshot (restored
    next) instead of evicting it; the report says so, and that nothing was evicted."""
    store = _budgeted(tmp_path, 10)
    a_file = _snap(store, "a", "s", used=1.0)
    saved = _save(store, "b", restoring="a")
    assert saved["saved"] is False and saved["kept"] is False and saved["evicted"] == []
    assert "beside the 8 of the snapshot restored next (a, session 's')" in saved["reason"]
    assert "kv_snapshot_max_bytes = 10" in saved["reason"] and saved["bytes"] == 8
    assert a_file.exists() and _held(store) == [("a", "s")]
    assert sorted(p.name for p in store.dir.iterdir()) == [a_file.name, f"{a_file.stem}.json"]
    # going elsewhere (no restore of a next), the least recently used one goes as before
    gone = _save(store, "b", restoring=None)
    assert gone["kept"] is True and "saved" not in gone
    assert gone["evicted"] == [{"model": "a", "session": "s", "bytes": 8}]
    assert not a_file.exists() and _held(store) == [("b", "s")]


@pytest.mark.parametrize(
    ("prefer", "evicted"),
    [(None, "t"), (SessionRef("t", None), "s")],  # the most recent session; the switch's own
)
def test_the_session_restored_next_is_the_one_whose_snapshot_stays(
    tmp_path: Path, prefer: SessionRef | None, evicted: str
) -> None:
    store = _budgeted(tmp_path, 16)
    _snap(store, "a", "t", used=1.0)  # the least recently used one
    _snap(store, "a", "s", used=2.0)
    saved = _save(store, "b", restoring="a", session=prefer)
    assert saved["kept"] is True
    assert saved["evicted"] == [{"model": "a", "session": evicted, "bytes": 8}]
    assert ("a", evicted) not in _held(store) and ("b", "s") in _held(store)


def test_a_snapshot_larger_than_the_budget_is_not_kept_and_evicts_nothing(
    tmp_path: Path,
) -> None:
    store = _budgeted(tmp_path, 7)
    older = _snap(store, "b", "s", used=1.0, size=4)  # the same session's, from before
    other = _snap(store, "a", "t", used=2.0, size=3)
    saved = _save(store, "b", restoring=None)
    assert saved["saved"] is False and saved["kept"] is False and saved["evicted"] == []
    assert saved["reason"] == ("not kept: 8 bytes, more than [switch] kv_snapshot_max_bytes = 7"), (
        saved
    )
    assert older.exists() and other.exists() and _held(store) == [("a", "t"), ("b", "s")]
    assert len(list(store.dir.glob("kv-*.bin"))) == 2  # the new file is gone


def test_a_kept_save_replaces_its_sessions_older_snapshot_and_evicts_by_use(
    tmp_path: Path,
) -> None:
    store = _budgeted(tmp_path, 16)
    old = _snap(store, "b", "s", used=3.0)  # superseded, not evicted
    _snap(store, "a", "t", used=1.0)
    _snap(store, "a", "u", used=2.0)
    saved = _save(store, "b", restoring="a")  # a's snapshot of s: none to protect
    assert saved["kept"] is True and not old.exists()
    assert saved["evicted"] == [{"model": "a", "session": "t", "bytes": 8}]
    assert _held(store) == [("a", "u"), ("b", "s")] and store.stats()["bytes"] == 16


def test_a_lowered_budget_applies_at_start(tmp_path: Path) -> None:
    store = _budgeted(tmp_path, 10)
    newest = _snap(store, "a", "s", used=3.0)
    _snap(store, "b", "s", used=1.0)
    _snap(store, "a", "t", used=2.0)
    store.prune()  # what start does, right after it opens the folder
    assert _held(store) == [("a", "s")] and newest.exists()
    assert store.stats() == {"count": 1, "bytes": 8}


def test_a_reload_applies_a_lowered_budget_at_once(tmp_path: Path) -> None:
    store = _budgeted(tmp_path, 100)
    _snap(store, "a", "t", used=1.0)
    _snap(store, "b", "s", used=2.0)
    config = dataclasses.replace(
        store.config,
        switch=dataclasses.replace(store.config.switch, kv_snapshot_max_bytes=8),
    )
    store.configure(config)  # what the reload's Reconfigure command does to the snapshots
    assert store.config is config and _held(store) == [("b", "s")]


def test_a_save_in_flight_is_not_an_orphan_to_a_budget_run_beside_it(tmp_path: Path) -> None:
    """A reload's budget may run while llama-server writes a snapshot (no sidecar yet)."""
    store = _budgeted(tmp_path, 100)
    client = _SavingClient(store.dir)

    async def slot(model: str, action: str, filename: str, timeout: float) -> dict[str, int]:
        answer = await _SavingClient.slot(client, model, action, filename, timeout)
        store.apply_budget()
        assert (store.dir / filename).exists()
        return answer

    store.client = cast(Any, SimpleNamespace(slot=slot))
    saved = _save(store, "b", restoring="a")
    assert saved["kept"] is True and _held(store) == [("b", "s")]


def test_the_scheduler_asks_whether_a_session_has_a_snapshot_for_a_model(tmp_path: Path) -> None:
    store = _store(tmp_path, ("a", "b"))
    assert not store.has("a", "", "s")  # no folder yet
    store.ensure_folder()
    path = _snap(store, "a", "s", used=1.0)
    assert store.has("a", "", "s")  # the write is seen at once
    assert not store.has("b", "", "s") and not store.has("a", "", "t")
    assert not store.has("a", "other-key", "s")  # another key's session of that id
    store.forget_session("", "s")  # its session deleted: the snapshot goes
    assert not path.exists()
    assert not store.has("a", "", "s")
