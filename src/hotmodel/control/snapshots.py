"""Per-session KV snapshots: a model's own prompt cache, put aside before it is unloaded
and brought back when the same model and the same conversation return.

:class:`Snapshots` is what the engine asks for (``KvOps``): the save and restore
steps. The folder, its files, their validity and the byte budget are
:mod:`~hotmodel.control.snapshot_folder`'s; the proof that a restore took is
:mod:`~hotmodel.control.snapshot_proof`'s.

KV entries are never carried across models: a snapshot is restored only into
the model that wrote it, and only when everything that shapes its KV is the
same (:func:`~hotmodel.control.snapshot_folder.identity`). It is labelled with
the session whose prompt it holds and a hash of the exact messages it covers,
and restored only when those messages still begin what would be sent for that
session now. The first request on the model after it (that session's next
turn, or a replay before the model serves) then reads only what was added
meanwhile, and its ``cache_n`` proves the restore took. The snapshot a switch
restores next is never evicted to make room for the one it saves: that one
gives way instead, as does a snapshot larger than the whole budget
(:meth:`Snapshots._keep`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hotmodel.config import Config
from hotmodel.control.execution import ms_since
from hotmodel.control.ports import SnapshotShare
from hotmodel.control.snapshot_folder import (
    Digests,
    Meta,
    SnapshotFolder,
    identity,
    key_of,
    over_budget,
    portable,
)
from hotmodel.control.snapshot_proof import NO_TAKE, Proofs, Turn, Unproved
from hotmodel.errors import HotModelError
from hotmodel.router.client import RouterClient
from hotmodel.sessions.service import SessionRef, SessionService
from hotmodel.sessions.slots import Covered, SlotLedger

# what the rest of hotmodel imports from here
__all__ = ["NO_TAKE", "Digests", "Meta", "Snapshots", "Turn", "Unproved", "identity"]

log = logging.getLogger("hotmodel.control")


class Snapshots:
    """The save/restore steps the engine asks for (``KvOps``), over the folder."""

    def __init__(
        self,
        config: Config,
        binary: Path,
        client: RouterClient,
        sessions: SessionService,
        ledger: SlotLedger,
    ) -> None:
        self.client = client
        self.sessions = sessions
        self.ledger = ledger
        self.folder = SnapshotFolder(config, binary)
        self.proofs = Proofs(self.folder, ledger)
        self.share: SnapshotShare | None = None  # in a cluster: the nodes' shared index

    @property
    def config(self) -> Config:
        return self.folder.config  # live: a reload replaces it

    @property
    def binary(self) -> Path:
        return self.folder.binary

    @property
    def dir(self) -> Path:
        return self.folder.dir

    @property
    def _timeout(self) -> float:
        return self.config.switch.load_timeout_seconds  # live: a reload may change it

    # --- the folder's and the proofs' own, for the engine, the runtime and the HTTP layer

    def ensure_folder(self) -> None:
        self.folder.ensure_folder()

    def has(self, model: str, owner: str, session_id: str) -> bool:
        return self.folder.has(model, owner, session_id)

    def stats(self) -> dict[str, int]:
        return self.folder.stats()

    def prune(self) -> None:
        self.folder.prune()

    def forget_session(self, owner: str, session_id: str) -> int:
        return self.folder.forget_session(owner, session_id)

    def configure(self, config: Config) -> None:
        self.folder.configure(config)

    def apply_budget(self) -> list[dict[str, Any]]:
        return self.folder.apply_budget()

    def turn_ended(self, turn: Turn) -> None:
        self.proofs.turn_ended(turn)

    def proved(self, model: str, cached: int, session_id: str | None) -> bool | None:
        return self.proofs.proved(model, cached, session_id)

    # --- the steps

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
        metas = self.folder.metas()
        self.folder.drop_orphans(metas)
        others = [m for m in metas if key_of(m) != key_of(meta)]  # the rest are superseded
        nxt = max((m for m in others if key_of(m) == wanted), key=lambda m: m.created, default=None)
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
            self.folder.delete_files(Path(meta.file).stem)
            return {"saved": False, "kept": False, "reason": f"not kept: {why}", "evicted": []}
        self.folder.write(meta)
        for old in metas:
            if key_of(old) == key_of(meta):
                self.folder.delete(old, "superseded by a newer snapshot")
        return {
            "kept": True,
            "evicted": self.folder.evict(over_budget([*others, meta], limit, keep)),
        }

    async def save(
        self, model: str, restoring: str | None = None, session: SessionRef | None = None
    ) -> dict[str, Any] | None:
        """Before ``model`` is unloaded: keep its slot, if a session's prompt is in it.
        ``restoring``: the model the same command restores next, for ``session`` (see
        :meth:`_keep`)."""
        covered = self.ledger.get(model)
        restored = self.proofs.unproved.pop(model, None)  # no request on it will prove anything
        preset = self.config.presets.models.get(model)
        if covered is None or preset is None or preset.model_path is None:
            return None  # nobody's slot, or a model whose weights cannot be checked
        if model in self.proofs.no_take:
            return {"saved": False, "reason": NO_TAKE}
        if (
            restored is not None
            and covered is restored.covered
            and self.folder.intact(restored.meta)
        ):
            return self._kept(restored.meta)  # no request since its restore
        stem = f"kv-{secrets.token_hex(8)}"
        self.folder.saving.add(stem)
        try:
            saved = await self._save_as(stem, model, covered, (restoring, session))
        finally:
            self.folder.saving.discard(stem)
        await self.publish()  # in a cluster: the others may fetch it (a few ms)
        return saved

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
        path = self.folder.dir / f"{stem}.bin"
        try:
            size = path.stat().st_size
            digest = await self.folder.digests.of(path)
        except OSError as exc:
            raise HotModelError(f"the saved snapshot {path} cannot be read: {exc}") from exc
        if await self.sessions.store.get(covered.owner, covered.session_id) is None:
            self.folder.delete_files(stem)  # deleted meanwhile: its KV must not outlive it
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

    def _kept(self, meta: Meta) -> dict[str, Any]:
        """The slot holds what ``meta``'s file holds: that file is kept, not written again."""
        meta.used = time.time()
        self.folder.write(meta)
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
        self.proofs.unproved.pop(model, None)
        found = await self.sessions.replay_prompt(model, session)
        if found is None:
            return None
        stored, prompt = found
        messages = prompt.messages()
        candidates = [
            m
            for m in self.folder.metas()
            if (m.model, m.owner, m.session_id) == (model, stored.owner, stored.id)
        ]
        fetched = None
        if not candidates:
            fetched = await self._fetch(model, stored.owner, stored.id)
            if fetched is None:
                return {"restored": False, "reason": "no snapshot of this session for this model"}
            candidates = [fetched[0]]
        meta = max(candidates, key=lambda m: m.created)
        refused = await self.folder.refusal(meta, messages)
        if refused is not None:
            return {"restored": False, "reason": refused}
        t0 = time.monotonic()
        try:
            answer = await self.client.slot(model, "restore", meta.file, self._timeout)
        except HotModelError as exc:
            return {"restored": False, "reason": f"llama-server refused it: {exc}"}
        meta.used = time.time()
        self.folder.write(meta)
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
        if fetched is not None:
            info["fetched_from"] = fetched[1]  # another node of the cluster saved it
        self.proofs.unproved[model] = Unproved(meta, info, gen, covered)
        return info

    # --- in a cluster: the index every node shares, and another node's snapshot fetched

    async def publish(self) -> None:
        """Tell the cluster's index which snapshots this node keeps (nothing alone)."""
        if self.share is None:
            return
        try:
            kept = []
            for meta in self.folder.metas():
                port = await asyncio.to_thread(portable, self.config, self.binary, meta.model)
                kept.append({**asdict(meta), "portable": port})
            await self.share.publish(kept)
        except (HotModelError, OSError, KeyError) as exc:
            log.warning("the cluster's KV snapshot index was not updated: %s", exc)

    async def _fetch(self, model: str, owner: str, session_id: str) -> tuple[Meta, str] | None:
        """Another node's snapshot of this session for ``model``, downloaded into the folder
        within its budget (None: no node has a valid one, or it could not be fetched)."""
        if self.share is None:
            return None
        stem = f"kv-{secrets.token_hex(8)}"
        self.folder.saving.add(stem)
        try:
            port = await asyncio.to_thread(portable, self.config, self.binary, model)
            got = await self.share.fetch(model, owner, session_id, port, self.dir / f"{stem}.bin")
            if got is None:
                return None
            now = time.time()
            meta = Meta(
                file=f"{stem}.bin",
                model=model,
                owner=owner,
                session_id=session_id,
                n_messages=int(got["n_messages"]),
                messages_hash=str(got["messages_hash"]),
                identity=await asyncio.to_thread(identity, self.config, self.binary, model),
                size=int(got["size"]),
                sha256=str(got["sha256"]),
                tokens=int(got["tokens"]),
                created=now,
                used=now,
            )
            kept = await self._keep(meta, None, None)
        except (HotModelError, OSError, KeyError, ValueError) as exc:
            log.warning("no KV snapshot fetched for session %r: %s", session_id, exc)
            self.folder.delete_files(stem)
            return None
        finally:
            self.folder.saving.discard(stem)
        if not kept.get("kept"):
            return None
        await self.publish()
        return meta, str(got.get("node", ""))
