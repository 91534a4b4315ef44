"""Per-session KV snapshots: a model's own prompt cache, put aside before it is unloaded
and brought back when the same model and the same conversation return.

KV entries are never carried across models: a snapshot is restored only into
the model that wrote it, and only when everything that shapes its KV is the
same (:func:`identity`: the GGUF file's size, mtime and a hash of its first MiB,
the llama-server binary, ctx size, cache types, slots, extra arguments and the
model's preset options). It is labelled with the session whose prompt it
holds and a hash of the exact messages it covers, and restored only when those
messages still begin what would be sent for that session now. The first
request on the model after it (that session's next turn, or a replay before
the model serves) then reads only what was added meanwhile, and its ``cache_n``
proves the restore took (:meth:`Snapshots.proved`). Files are named by
hotmodel (``kv-<random>.bin``), never from client input; each has a JSON
sidecar, and its sha256 is checked before it is handed back to llama-server
(:class:`Digests`: again only when the file changed since hotmodel last read
it), so a truncated or corrupted file is refused instead of restored. The
folder is kept under ``[switch] kv_snapshot_max_bytes`` (least recently used
first; at start and at a reload too), except that the snapshot a switch restores
next is never evicted to make room for the one it saves: that one gives way
instead, as does a snapshot larger than the whole budget (:meth:`Snapshots._keep`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hotmodel.config import Config
from hotmodel.control.run import ms_since
from hotmodel.errors import HotModelError
from hotmodel.presets import PATH_KEYS
from hotmodel.router.client import RouterClient
from hotmodel.sessions.context import Message
from hotmodel.sessions.service import SessionRef, SessionService
from hotmodel.sessions.slots import Covered, SlotLedger, messages_hash

log = logging.getLogger("hotmodel.control")

_HEAD_BYTES = 1 << 20  # the GGUF header and metadata live at the start of the file
_NAME = re.compile(r"kv-[0-9a-f]{16}")  # what save() names a snapshot: nothing else is read
NO_TAKE = (
    "not saved: a restore of this model did not take in this llama-server "
    "(sliding-window attention keeps too little of the prompt; --swa-full keeps it)"
)


def _file_id(path: Path, head: bool) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    digest = ""
    if head:
        with contextlib.suppress(OSError), path.open("rb") as f:
            digest = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
    return f"{st.st_size}:{st.st_mtime_ns}:{digest}"


def identity(config: Config, binary: Path, model: str) -> dict[str, str]:
    """Everything that makes a snapshot of ``model`` valid, one entry per reason."""
    r = config.router
    preset = config.presets.models[model]
    options = {
        k: _file_id(Path(v), True) if k in PATH_KEYS and k not in ("model", "m") else v
        for k, v in sorted(preset.options.items())
    }
    kv_args = {
        "ctx_size": r.ctx_size,
        "cache_type_k": r.cache_type_k,
        "cache_type_v": r.cache_type_v,
        "parallel": r.parallel,
        "extra_args": list(r.extra_args),
        "preset": options,  # a LoRA or other file named here counts by its content
        "globals": dict(sorted(config.presets.globals.items())),
    }
    model_file = "remote" if preset.model_path is None else _file_id(preset.model_path, True)
    return {
        "model file": model_file,
        "llama-server binary": f"{binary}:{_file_id(binary, False)}",
        "KV settings": hashlib.sha256(json.dumps(kv_args, sort_keys=True).encode()).hexdigest(),
    }


@dataclass
class Meta:
    """A snapshot's sidecar (``kv-<id>.json``)."""

    file: str
    model: str
    owner: str
    session_id: str
    n_messages: int
    messages_hash: str
    identity: dict[str, str]
    size: int
    sha256: str
    tokens: int
    created: float
    used: float


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


def _key(meta: Meta) -> tuple[str, str, str]:
    """Whose snapshot ``meta`` is: (model, owner, session id); one of each is kept."""
    return (meta.model, meta.owner, meta.session_id)


def _entry(meta: Meta) -> dict[str, Any]:
    """How a report names a snapshot: its model, session and size."""
    return {"model": meta.model, "session": meta.session_id, "bytes": meta.size}


def _over_budget(metas: Sequence[Meta], limit: int, keep: Sequence[Meta] = ()) -> list[Meta]:
    """The snapshots of ``metas`` to evict, least recently used first, until they fit in
    ``limit`` bytes; none of ``keep`` (which the caller made sure fit) is among them."""
    kept = {m.file for m in keep}
    total = sum(m.size for m in metas)
    evicted = []
    for meta in sorted(metas, key=lambda m: m.used):
        if total <= limit:
            break
        if meta.file not in kept:
            evicted.append(meta)
            total -= meta.size
    return evicted


def _unprovable(pending: Unproved, turn: Turn, latest: int) -> str | None:
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


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Digests:
    """The sha256 of snapshot files, remembered while a file stays untouched.

    Hashing a 68 MB snapshot costs ~40 ms on a 2-core CPU, on the switch-back's path.
    A file hashed once (right after llama-server wrote it) is hashed again only when
    its inode, size, mtime or ctime changed: any write or truncation moves them, and on
    POSIX ctime cannot be set back, not even by ``os.utime``. Nothing is remembered
    across restarts, so a snapshot is always hashed in full at its first restore there.
    """

    def __init__(self) -> None:
        self._known: dict[Path, tuple[tuple[int, int, int, int], str]] = {}

    async def of(self, path: Path) -> str:
        """``path``'s sha256 (OSError when it cannot be read)."""
        key = _stat_key(path)
        known = self._known.get(path)
        if known is not None and known[0] == key:
            return known[1]
        digest = await asyncio.to_thread(_sha256, path)
        if _stat_key(path) == key:  # not changed while it was read
            self._known[path] = (key, digest)
        return digest

    def forget(self, path: Path) -> None:
        self._known.pop(path, None)


class Snapshots:
    """The snapshot folder, and the save/restore steps the engine asks for (``KvOps``)."""

    def __init__(
        self,
        config: Config,
        binary: Path,
        client: RouterClient,
        sessions: SessionService,
        ledger: SlotLedger,
    ) -> None:
        self.config = config
        self.binary = binary
        self.client = client
        self.sessions = sessions
        self.ledger = ledger
        self.dir = config.kv_dir
        # per model, the restore the first request after it proves (or not)
        self._unproved: dict[str, Unproved] = {}
        # models whose restores do not take in this llama-server (Gemma 3's sliding-window
        # attention keeps too little: it re-reads the prompt): not saved again this run
        self._no_take: set[str] = set()
        # the files being saved now (no sidecar yet): not orphans, whatever runs meanwhile
        self._saving: set[str] = set()
        # whose snapshots the folder holds, (model, owner, session id): read again after
        # a change (the scheduler asks on every decision)
        self._index: set[tuple[str, str, str]] | None = None
        self.digests = Digests()

    @property
    def _timeout(self) -> float:
        return self.config.switch.load_timeout_seconds  # live: a reload may change it

    def ensure_folder(self) -> None:
        with contextlib.suppress(OSError):  # else the load fails, saying why
            self.dir.mkdir(parents=True, exist_ok=True)

    # --- the folder ---

    def _metas(self) -> list[Meta]:
        metas = []
        for side in self.dir.glob("kv-*.json"):
            try:
                meta = Meta(**json.loads(side.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                meta = None
            if meta is None or meta.file != f"{side.stem}.bin" or not _NAME.fullmatch(side.stem):
                self._delete_files(side.stem)  # unreadable or not hotmodel's own: of no use
                continue
            metas.append(meta)
        return metas

    def has(self, model: str, owner: str, session_id: str) -> bool:
        """Whether a snapshot of this session for ``model`` is kept (cheap: no file is read
        unless the folder changed since the last question)."""
        if self._index is None:
            self._index = {_key(m) for m in self._metas()} if self.dir.is_dir() else set()
        return (model, owner, session_id) in self._index

    def _write(self, meta: Meta) -> None:
        side = self.dir / f"{Path(meta.file).stem}.json"
        partial = side.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(meta)), encoding="utf-8")
        partial.replace(side)
        self._index = None  # after the change: an index read meanwhile is read again

    def _delete_files(self, stem: str) -> None:
        self.digests.forget(self.dir / f"{stem}.bin")
        for suffix in (".bin", ".json"):
            with contextlib.suppress(OSError):
                (self.dir / f"{stem}{suffix}").unlink()
        self._index = None

    def _delete(self, meta: Meta, why: str) -> None:
        log.info("deleting KV snapshot %s (%s): %s", meta.file, meta.model, why)
        self._delete_files(Path(meta.file).stem)

    def stats(self) -> dict[str, int]:
        metas = self._metas() if self.dir.is_dir() else []
        return {"count": len(metas), "bytes": sum(m.size for m in metas)}

    def prune(self) -> None:
        """At start: drop snapshots of models that are gone or whose file or settings changed,
        and files without a sidecar."""
        if not self.dir.is_dir():
            return
        self._drop_orphans(self._metas())
        for meta in self._metas():
            if meta.model not in self.config.presets.models:
                self._delete(meta, "no such preset any more")
            elif (why := self._changed(meta)) is not None:
                self._delete(meta, why)
        self.apply_budget()  # a budget lowered while hotmodel was stopped

    def _drop_orphans(self, metas: Sequence[Meta]) -> None:
        """Delete the snapshot files that no sidecar of ``metas`` names."""
        known = {Path(m.file).stem for m in metas} | self._saving
        for path in self.dir.glob("kv-*.bin"):
            if path.stem not in known:
                self._delete_files(path.stem)

    def forget_session(self, owner: str, session_id: str) -> int:
        gone = [m for m in self._metas() if (m.owner, m.session_id) == (owner, session_id)]
        for meta in gone:
            self._delete(meta, "its session was deleted")
        return len(gone)

    def _changed(self, meta: Meta) -> str | None:
        now = identity(self.config, self.binary, meta.model)
        changed = [reason for reason, value in now.items() if meta.identity.get(reason) != value]
        return None if not changed else f"{', '.join(changed)} changed"

    def configure(self, config: Config) -> None:
        """A reload's configuration: a preset's options count in a snapshot's identity,
        and a lowered ``kv_snapshot_max_bytes`` applies at once."""
        self.config = config
        self.apply_budget()

    def apply_budget(self) -> list[dict[str, Any]]:
        """Bring the folder under ``[switch] kv_snapshot_max_bytes`` now, least recently
        used first (at start, and when a reload changed it); what was evicted."""
        if not self.dir.is_dir():
            return []
        metas = self._metas()
        self._drop_orphans(metas)  # a file whose sidecar was lost would escape the budget
        return self._evict(_over_budget(metas, self.config.switch.kv_snapshot_max_bytes))

    def _evict(self, metas: Sequence[Meta]) -> list[dict[str, Any]]:
        limit = self.config.switch.kv_snapshot_max_bytes
        for meta in metas:
            self._delete(meta, f"over [switch] kv_snapshot_max_bytes = {limit}")
        return [_entry(m) for m in metas]

    async def _restore_key(
        self, model: str | None, session: SessionRef | None
    ) -> tuple[str, str, str] | None:
        """Whose snapshot ``restore(model, session)`` will look for (None: no restore
        follows): ``session``'s, else the most recently used one's."""
        if model is None:
            return None
        if session is not None:  # as SessionService.replay_prompt
            return (model, session.owner, session.id)
        recent = await self.sessions.store.most_recent(1)  # who, not what: one message
        return None if recent is None else (model, recent.owner, recent.id)

    async def _keep(
        self, meta: Meta, restoring: str | None, session: SessionRef | None
    ) -> dict[str, Any]:
        """Keep the snapshot ``meta`` just saved (its sidecar not written yet) within the
        budget, and say what was kept and evicted. The snapshot the command restores next
        (``restoring``'s) is never evicted for it: when both do not fit, this one gives
        way, as does one larger than the whole budget; either evicts nothing."""
        limit = self.config.switch.kv_snapshot_max_bytes
        wanted = await self._restore_key(restoring, session)
        metas = self._metas()
        self._drop_orphans(metas)
        others = [m for m in metas if _key(m) != _key(meta)]  # the rest are superseded
        nxt = max((m for m in others if _key(m) == wanted), key=lambda m: m.created, default=None)
        keep = [meta] if nxt is None else [meta, nxt]
        why = None
        if meta.size > limit:
            why = f"{meta.size} bytes, more than [switch] kv_snapshot_max_bytes = {limit}"
        elif nxt is not None and meta.size + nxt.size > limit:
            why = (
                f"{meta.size} bytes beside the {nxt.size} of the snapshot restored next "
                f"({nxt.model}, session {nxt.session_id!r}) exceed "
                f"[switch] kv_snapshot_max_bytes = {limit}"
            )
        if why is not None:
            log.info("not keeping the KV snapshot of %s: %s", meta.model, why)
            self._delete_files(Path(meta.file).stem)
            return {"saved": False, "kept": False, "reason": f"not kept: {why}", "evicted": []}
        self._write(meta)
        for old in metas:
            if _key(old) == _key(meta):
                self._delete(old, "superseded by a newer snapshot")
        return {"kept": True, "evicted": self._evict(_over_budget([*others, meta], limit, keep))}

    # --- the steps ---

    async def save(
        self, model: str, restoring: str | None = None, session: SessionRef | None = None
    ) -> dict[str, Any] | None:
        """Before ``model`` is unloaded: keep its slot, if a session's prompt is in it.
        ``restoring``: the model the same command restores next, for ``session`` (see
        :meth:`_keep`)."""
        covered = self.ledger.get(model)
        restored = self._unproved.pop(model, None)  # no request on it will prove anything
        preset = self.config.presets.models.get(model)
        if covered is None or preset is None or preset.model_path is None:
            return None  # nobody's slot, or a model whose weights cannot be checked
        if model in self._no_take:
            return {"saved": False, "reason": NO_TAKE}
        if restored is not None and covered is restored.covered and self._intact(restored.meta):
            return self._kept(restored.meta)  # no request since its restore
        stem = f"kv-{secrets.token_hex(8)}"
        self._saving.add(stem)
        try:
            return await self._save_as(stem, model, covered, (restoring, session))
        finally:
            self._saving.discard(stem)

    async def _save_as(
        self,
        stem: str,
        model: str,
        covered: Covered,
        restoring: tuple[str | None, SessionRef | None],
    ) -> dict[str, Any] | None:
        """Save ``model``'s slot, which holds ``covered``, as ``stem``."""
        t0 = time.monotonic()
        answer = await self.client.slot(model, "save", f"{stem}.bin", self._timeout)
        path = self.dir / f"{stem}.bin"
        try:
            size = path.stat().st_size
            digest = await self.digests.of(path)
        except OSError as exc:
            raise HotModelError(f"the saved snapshot {path} cannot be read: {exc}") from exc
        if await self.sessions.store.get(covered.owner, covered.session_id) is None:
            self._delete_files(stem)  # deleted meanwhile: its KV must not outlive it
            return None
        now = time.time()
        meta = Meta(
            file=f"{stem}.bin",
            model=model,
            owner=covered.owner,
            session_id=covered.session_id,
            n_messages=covered.n_messages,
            messages_hash=covered.messages_hash,
            identity=await asyncio.to_thread(identity, self.config, self.binary, model),
            size=size,
            sha256=digest,
            tokens=int(answer.get("n_saved") or 0),
            created=now,
            used=now,
        )
        kept = await self._keep(meta, *restoring)
        info = {"session": meta.session_id, "tokens": meta.tokens, "bytes": size}
        return {**info, "ms": ms_since(t0), **kept}

    def _intact(self, meta: Meta) -> bool:
        """``meta``'s file is still there, at its size (its sha256 is read at a restore)."""
        try:
            return (self.dir / meta.file).stat().st_size == meta.size
        except OSError:
            return False

    def _kept(self, meta: Meta) -> dict[str, Any]:
        """The slot holds what ``meta``'s file holds: that file is kept, not written again."""
        meta.used = time.time()
        self._write(meta)
        return {
            "saved": False,
            "reason": "unchanged since its restore: that snapshot is kept",
            "session": meta.session_id,
            "tokens": meta.tokens,
        }

    async def restore(self, model: str, session: SessionRef | None = None) -> dict[str, Any] | None:
        """After ``model`` is loaded: bring back ``session``'s snapshot for it (None: the
        most recently used session's), when it is valid and still begins what would be
        sent now."""
        gen = self.ledger.touch(model)  # a freshly loaded model's slot is empty
        self._unproved.pop(model, None)
        found = await self.sessions.replay_prompt(model, session)
        if found is None:
            return None
        stored, prompt = found
        messages = prompt.messages()
        candidates = [
            m
            for m in self._metas()
            if (m.model, m.owner, m.session_id) == (model, stored.owner, stored.id)
        ]
        if not candidates:
            return {"restored": False, "reason": "no snapshot of this session for this model"}
        meta = max(candidates, key=lambda m: m.created)
        refused = await self._refuse(meta, messages)
        if refused is not None:
            return {"restored": False, "reason": refused}
        t0 = time.monotonic()
        try:
            answer = await self.client.slot(model, "restore", meta.file, self._timeout)
        except HotModelError as exc:
            return {"restored": False, "reason": f"llama-server refused it: {exc}"}
        meta.used = time.time()
        self._write(meta)
        self.sessions.tenants.wrote(model, stored.owner)  # the slot holds this key's prompt
        covered = self.ledger.cover(
            model, gen, stored.owner, stored.id, messages[: meta.n_messages]
        )
        info = {
            "restored": True,
            "session": stored.id,
            "tokens": int(answer.get("n_restored") or 0),
            "bytes": meta.size,
            "ms": ms_since(t0),
            "took": None,  # not known until a request on the model shows its cache_n
        }
        self._unproved[model] = Unproved(meta, info, gen, covered)
        return info

    async def _refuse(self, meta: Meta, messages: Sequence[Message]) -> str | None:
        """Why ``meta`` must not be restored now (None: it may)."""
        changed = await asyncio.to_thread(self._changed, meta)
        if changed is not None:
            self._delete(meta, changed)
            return f"snapshot refused: {changed}"
        if len(messages) < meta.n_messages or (
            messages_hash(messages[: meta.n_messages]) != meta.messages_hash
        ):
            return "snapshot refused: the conversation no longer begins with what it holds"
        path = self.dir / meta.file
        try:
            intact = path.stat().st_size == meta.size and (
                await self.digests.of(path) == meta.sha256
            )
        except FileNotFoundError:
            self._delete(meta, "its file is gone")
            return "snapshot refused: its file is gone"
        except OSError:
            intact = False
        if not intact:
            self._delete(meta, "file truncated or corrupted")
            return "snapshot refused: its file is truncated or corrupted"
        return None

    def turn_ended(self, turn: Turn) -> None:
        """A chat request ended with an answer. The first one after a restore proves it
        when it is the restored session's next turn, nothing ran beside it on the slot,
        and its prompt still begins with what the snapshot holds; otherwise the verdict
        stays unknown (``unchecked`` says why), never a false "did not take"."""
        pending = self._unproved.pop(turn.model, None)
        if pending is None:
            return
        why = _unprovable(pending, turn, self.ledger.latest(turn.model))
        if why is not None:
            pending.info["unchecked"] = why
            return
        self._verdict(turn.model, pending, turn.cached)

    def proved(self, model: str, cached: int, session_id: str | None) -> bool | None:
        """The replay right after the restore (the overlap policy: before the model
        serves) prefilled ``session_id``'s conversation and found ``cached`` prompt
        tokens in the cache: whether the restore took (None: none waits, or that replay
        was another session's and cannot tell)."""
        pending = self._unproved.pop(model, None)
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
            self._delete(pending.meta, why)
            self._no_take.add(model)
        return took
