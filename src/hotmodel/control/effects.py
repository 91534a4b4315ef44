"""What each step of a command does to the world: drain, unload, settle, check, restart,
load, replay, and the KV snapshot's save and restore.

:class:`StepEffects` is the part of the :class:`~hotmodel.control.engine.Engine` that
calls out (the router, the router process, the traffic gate, the GPU probe, the snapshot
store, the replay hook, all injected through ``ports.py``); the engine decides which step
runs, in which order, and what a failure means. A step that cannot do its work raises
:class:`~hotmodel.control.execution.StepFailedError`, or returns a detail for its phase event
(a :class:`~hotmodel.control.execution.Skipped` when it had nothing to do).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hotmodel.config import SwitchConfig
from hotmodel.control.execution import SKIPPED, Detail, Execution, Skipped, StepFailedError, summary
from hotmodel.control.gpu import GpuProbe, GpuReading, NoGpu, wait_settled
from hotmodel.control.plan import Step
from hotmodel.control.ports import KvOps, LifecycleOps, ProcessOps, Replayer
from hotmodel.control.report import SwitchReport
from hotmodel.control.traffic import TrafficGate
from hotmodel.errors import HotModelError, ModelLoadError, SwitchError
from hotmodel.sessions.service import SessionRef


class StepEffects:
    """The steps' effects; the engine (its subclass) sets every attribute below."""

    config: SwitchConfig
    drain_timeout: float
    lifecycle: LifecycleOps  # load and unload on the router (router.lifecycle)
    gate: TrafficGate
    gpu: GpuProbe
    log_tail: Callable[[], str]
    replayer: Replayer | None  # replays a session into a model (SessionService.replay)
    baseline_mib: int | None
    process: ProcessOps | None
    preflight: Callable[[str], None] | None
    kv: KvOps | None

    async def _kv_step(self, step: Step, ex: Execution) -> Detail:
        """Save the leaving model's KV snapshot, or restore the arriving one's. A failure
        costs speed, not correctness: a warning, and the replay reads everything."""
        model = ex.previous if step is Step.SAVE else ex.target
        if self.kv is None or model is None:
            return SKIPPED
        done = "saved" if step is Step.SAVE else "restored"  # the info's did-it field
        try:
            if step is Step.SAVE:
                info = await self.kv.save(model, ex.target, ex.session)  # run.target's is kept
            else:
                info = await self.kv.restore(model, ex.session)
        except Exception as exc:
            ex.report.warnings.append(f"KV snapshot {step.value} failed: {exc}")
            ex.report.snapshot[step.value] = {done: False, "reason": f"failed: {exc}"}
            return f"failed: {exc}"
        ex.report.snapshot[step.value] = info
        if info is None:
            return SKIPPED  # nothing to save, or no session to restore for
        if info.get(done) is False:  # nothing kept, or nothing restored: the replay reads all
            return Skipped(str(info.get("reason")))
        ex.restored = step is Step.RESTORE
        return f"{info.get('tokens')} tokens, {info.get('bytes')} bytes"

    async def _restore_previous(self, report: SwitchReport, model: str) -> None:
        """A rollback loaded ``model`` again, its slot empty: the snapshot saved on its way
        out comes back (``snapshot.rollback_restore``), and the slot's old label goes, so
        an empty slot is never saved under it."""
        if self.kv is None:
            return
        try:
            info = await self.kv.restore(model)
        except Exception as exc:
            info = {"restored": False, "reason": f"failed: {exc}"}
        if info is not None:
            report.snapshot["rollback_restore"] = info

    def _verify_restore(self, ex: Execution, model: str) -> None:
        """The replay after a restore must have found the restored tokens in the cache."""
        replay = ex.report.replay or {}
        cached, session = int(replay.get("cache_tokens") or 0), replay.get("session")
        if self.kv is not None and self.kv.proved(model, cached, session) is False:
            restore = ex.report.snapshot.get("restore") or {}
            ex.report.warnings.append(
                f"the KV restore did not take (cache_n {cached} of {restore.get('tokens')} "
                "restored tokens); the replay read the whole conversation"
            )

    async def _drain(self, report: SwitchReport, model: str, close_gate: bool) -> Detail:
        if close_gate:
            self.gate.close()  # from here on, new requests wait for the switch
        try:
            result = await self.gate.drain_model(
                model,
                self.drain_timeout,
                self.config.cancel_grace_seconds
                if self.config.drain_timeout_action == "cancel"
                else None,
                f"cancelled: switching {model!r} -> {report.to_model!r}",
            )
        except SwitchError as exc:
            raise StepFailedError(Step.DRAIN, str(exc)) from exc
        report.drained, report.cancelled = result.drained, result.cancelled
        return result.detail

    async def _unload(self, report: SwitchReport, model: str, background: bool) -> Detail:
        if report.gpu.before_unload is None:
            report.gpu.before_unload = await self._read_gpu()
        try:
            unloaded = await self.lifecycle.unload(
                model, self.config.unload_timeout_seconds, background
            )
        except HotModelError as exc:
            raise StepFailedError(Step.UNLOAD, f"unloading {model!r} failed: {exc}") from exc
        report.gpu.after_unload = await self._read_gpu()
        if not unloaded:
            return f"{model!r} was not loaded"
        return "its process exits while the next model loads" if background else None

    async def _settle(self, report: SwitchReport) -> Detail:
        after_unload = report.gpu.after_unload
        if self.config.settle_timeout_seconds <= 0 or after_unload is None:
            return SKIPPED
        before = report.gpu.before_unload
        report.gpu.after_settle, detail = await wait_settled(
            self.gpu,
            after_unload,
            None if before is None else before.used_mib,
            self.baseline_mib,
            self.config.settle_tolerance_mib,
            self.config.settle_timeout_seconds,
        )
        return detail

    def _check(self, target: str) -> Detail:
        if self.preflight is None:
            return SKIPPED
        try:
            self.preflight(target)
        except HotModelError as exc:
            raise StepFailedError(Step.CHECK, f"{exc}; nothing was changed") from exc
        return None

    async def _restart(self) -> Detail:
        if self.process is None or (self.process.running and not self.process.stale):
            return SKIPPED  # only the model's child died: the router is fine
        await self.lifecycle.exited()
        reloaded = self.process.stale
        if self.kv is not None:
            self.kv.ensure_folder()
        try:
            await self.process.restart()
        except HotModelError as exc:
            raise StepFailedError(Step.RESTART, str(exc), self.log_tail() or None) from exc
        return "the router reads the reloaded presets" if reloaded else None

    async def _load(self, report: SwitchReport, target: str) -> tuple[bool, Detail]:
        if self.kv is not None:
            self.kv.ensure_folder()  # deleted meanwhile, llama-server would refuse to start
        try:
            loaded = await self.lifecycle.load(target, self.config.load_timeout_seconds)
        except HotModelError as exc:
            tail = (exc.log_tail if isinstance(exc, ModelLoadError) else "") or self.log_tail()
            raise StepFailedError(Step.LOAD, summary(exc), tail or None) from exc
        report.gpu.after_load = await self._read_gpu()
        return loaded, None if loaded else f"{target!r} was loaded already"

    async def _replay(
        self, report: SwitchReport, target: str, session: SessionRef | None
    ) -> Detail:
        if self.replayer is None or not self.config.replay_session:
            return SKIPPED
        try:
            report.replay = await self.replayer(target, session)
        except HotModelError as exc:  # a failed prefill costs speed, not correctness
            report.warnings.append(f"replay failed: {exc}")
            return f"replay failed: {exc}"
        if report.replay is None:
            return SKIPPED  # no session to replay
        ms = report.replay.get("prompt_ms")
        ms_text = f"{ms:.1f}" if isinstance(ms, int | float) else "?"
        return f"{report.replay.get('prompt_tokens')} prompt tokens in {ms_text} ms"

    async def _read_gpu(self) -> GpuReading | None:
        if isinstance(self.gpu, NoGpu):
            return None
        return await asyncio.to_thread(self.gpu.read)
