"""The KV snapshot folder: one ``kv-<id>.bin`` per snapshot, its JSON sidecar, its
validity and the folder's byte budget.

A snapshot is valid only while everything that shapes its KV is the same
(:func:`identity`: the GGUF file's size, mtime and a hash of its first MiB,
the llama-server binary, ctx size, cache types, slots, extra arguments and the
model's preset options). Files are named by hotmodel (``kv-<random>.bin``),
never from client input; a sidecar that names anything else is not
hotmodel's and is deleted. The sha256 of a file is checked before it is handed
back to llama-server (:class:`Digests`: again only when the file changed since
hotmodel last read it). The folder is kept under ``[switch]
kv_snapshot_max_bytes``, least recently used first (:func:`over_budget`).
The save and restore steps are in :mod:`hotmodel.control.snapshots`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hotmodel.config import Config
from hotmodel.presets import PATH_KEYS
from hotmodel.sessions.context import Message
from hotmodel.sessions.slots import messages_hash

log = logging.getLogger("hotmodel.control")

_HEAD_BYTES = 1 << 20  # the GGUF header and metadata live at the start of the file
_NAME = re.compile(r"kv-[0-9a-f]{16}")  # what save() names a snapshot: nothing else is read


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


def portable(config: Config, binary: Path, model: str) -> dict[str, str]:
    """:func:`identity` as another host can check it: files by content, not by path and
    modification time (a cluster's nodes each have their own copies). A snapshot one node
    saved is valid on another only when these are equal."""
    preset = config.presets.models[model]
    model_file = "remote"
    if preset.model_path is not None:
        model_file = _content_id(preset.model_path, whole=False)
    return {
        "model file": model_file,
        "llama-server binary": _content_id(binary, whole=True),
        "KV settings": identity(config, binary, model)["KV settings"],
    }


_CONTENT: dict[tuple[Path, int, int, bool], str] = {}  # a binary is hashed once per change


def _content_id(path: Path, whole: bool) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    key = (path, st.st_size, st.st_mtime_ns, whole)
    if key not in _CONTENT:
        with path.open("rb") as f:
            digest = (
                hashlib.file_digest(f, "sha256") if whole else hashlib.sha256(f.read(_HEAD_BYTES))
            )
        _CONTENT[key] = f"{st.st_size}:{digest.hexdigest()}"
    return _CONTENT[key]


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


def key_of(meta: Meta) -> tuple[str, str, str]:
    """Whose snapshot ``meta`` is: (model, owner, session id); one of each is kept."""
    return (meta.model, meta.owner, meta.session_id)


def entry_of(meta: Meta) -> dict[str, Any]:
    """How a report names a snapshot: its model, session and size."""
    return {"model": meta.model, "session": meta.session_id, "bytes": meta.size}


def over_budget(metas: Sequence[Meta], limit: int, keep: Sequence[Meta] = ()) -> list[Meta]:
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


class SnapshotFolder:
    """The snapshot files of ``config.kv_dir``: read, written, validated and kept within
    the budget. Only hotmodel's own files (``kv-<16 hex>``) are ever read."""

    def __init__(self, config: Config, binary: Path) -> None:
        self.config = config
        self.binary = binary
        self.dir = config.kv_dir
        # the files being saved now (no sidecar yet): not orphans, whatever runs meanwhile
        self.saving: set[str] = set()
        # whose snapshots the folder holds, (model, owner, session id): read again after
        # a change (the scheduler asks on every decision)
        self._index: set[tuple[str, str, str]] | None = None
        self.digests = Digests()

    def ensure_folder(self) -> None:
        with contextlib.suppress(OSError):  # else the load fails, saying why
            self.dir.mkdir(parents=True, exist_ok=True)

    def metas(self) -> list[Meta]:
        metas = []
        for side in self.dir.glob("kv-*.json"):
            try:
                meta = Meta(**json.loads(side.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                meta = None
            if meta is None or meta.file != f"{side.stem}.bin" or not _NAME.fullmatch(side.stem):
                self.delete_files(side.stem)  # unreadable or not hotmodel's own: of no use
                continue
            metas.append(meta)
        return metas

    def has(self, model: str, owner: str, session_id: str) -> bool:
        """Whether a snapshot of this session for ``model`` is kept (cheap: no file is read
        unless the folder changed since the last question)."""
        if self._index is None:
            self._index = {key_of(m) for m in self.metas()} if self.dir.is_dir() else set()
        return (model, owner, session_id) in self._index

    def write(self, meta: Meta) -> None:
        side = self.dir / f"{Path(meta.file).stem}.json"
        partial = side.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(meta)), encoding="utf-8")
        partial.replace(side)
        self._index = None  # after the change: an index read meanwhile is read again

    def delete_files(self, stem: str) -> None:
        self.digests.forget(self.dir / f"{stem}.bin")
        for suffix in (".bin", ".json"):
            with contextlib.suppress(OSError):
                (self.dir / f"{stem}{suffix}").unlink()
        self._index = None

    def delete(self, meta: Meta, why: str) -> None:
        log.info("deleting KV snapshot %s (%s): %s", meta.file, meta.model, why)
        self.delete_files(Path(meta.file).stem)

    def stats(self) -> dict[str, int]:
        metas = self.metas() if self.dir.is_dir() else []
        return {"count": len(metas), "bytes": sum(m.size for m in metas)}

    def prune(self) -> None:
        """At start: drop snapshots of models that are gone or whose file or settings changed,
        and files without a sidecar."""
        if not self.dir.is_dir():
            return
        self.drop_orphans(self.metas())
        for meta in self.metas():
            if meta.model not in self.config.presets.models:
                self.delete(meta, "no such preset any more")
            elif (why := self.changed(meta)) is not None:
                self.delete(meta, why)
        self.apply_budget()  # a budget lowered while hotmodel was stopped

    def drop_orphans(self, metas: Sequence[Meta]) -> None:
        """Delete the snapshot files that no sidecar of ``metas`` names."""
        known = {Path(m.file).stem for m in metas} | self.saving
        for path in self.dir.glob("kv-*.bin"):
            if path.stem not in known:
                self.delete_files(path.stem)

    def forget_session(self, owner: str, session_id: str) -> int:
        gone = [m for m in self.metas() if (m.owner, m.session_id) == (owner, session_id)]
        for meta in gone:
            self.delete(meta, "its session was deleted")
        return len(gone)

    def changed(self, meta: Meta) -> str | None:
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
        metas = self.metas()
        self.drop_orphans(metas)  # a file whose sidecar was lost would escape the budget
        return self.evict(over_budget(metas, self.config.switch.kv_snapshot_max_bytes))

    def evict(self, metas: Sequence[Meta]) -> list[dict[str, Any]]:
        limit = self.config.switch.kv_snapshot_max_bytes
        for meta in metas:
            self.delete(meta, f"over [switch] kv_snapshot_max_bytes = {limit}")
        return [entry_of(m) for m in metas]

    def intact(self, meta: Meta) -> bool:
        """``meta``'s file is still there, at its size (its sha256 is read at a restore)."""
        try:
            return (self.dir / meta.file).stat().st_size == meta.size
        except OSError:
            return False

    async def refusal(self, meta: Meta, messages: Sequence[Message]) -> str | None:
        """Why ``meta`` must not be restored now, before ``messages`` (None: it may); a
        snapshot that can never be restored again is deleted."""
        changed = await asyncio.to_thread(self.changed, meta)
        if changed is not None:
            self.delete(meta, changed)
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
            self.delete(meta, "its file is gone")
            return "snapshot refused: its file is gone"
        except OSError:
            intact = False
        if not intact:
            self.delete(meta, "file truncated or corrupted")
            return "snapshot refused: its file is truncated or corrupted"
        return None
