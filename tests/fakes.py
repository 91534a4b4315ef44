"""Fakes for what cannot be real in a unit test: the router (its processes), GPU memory,
KV snapshots, the router process, the control loop's caller; and the helpers that run the
real control loop and engine on them. Shared by the engine, control-loop, KV, fit,
scheduler and resident tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiohttp import web

from hotmodel.config import Config, SwitchConfig, load_config
from hotmodel.control.commands import Switch
from hotmodel.control.controller import Controller
from hotmodel.control.decide import Rules
from hotmodel.control.engine import Engine
from hotmodel.control.feed import Feed
from hotmodel.control.gpu import GpuDevice, GpuReading, NoGpu
from hotmodel.control.idle import IdleUnloader
from hotmodel.control.report import Outcome, PhaseStatus, SwitchEvent, SwitchReport
from hotmodel.control.scheduler import Scheduler
from hotmodel.control.traffic import TrafficGate
from hotmodel.control.watchdog import Watchdog
from hotmodel.errors import ModelLoadError
from hotmodel.presets import Presets
from hotmodel.router.chat_http import ChatHttp
from hotmodel.router.client import RouterClient
from hotmodel.router.events import ModelEvents
from hotmodel.router.supervisor import RouterState, RouterSupervisor
from hotmodel.runtime import Services
from hotmodel.sessions.service import SessionRef, SessionService
from hotmodel.sessions.sqlite import SqliteStore
from hotmodel.sessions.store import SessionStore
from tests.upstreams import serving

_T = TypeVar("_T")


class FakeRouter:
    """Records every call; loads succeed unless the model is in ``broken``. Idempotent
    like the real client: loading a running model or unloading a stopped one is a no-op."""

    def __init__(
        self,
        loaded: str | None,
        models: tuple[str, ...] = ("a", "b", "c"),
        broken: frozenset[str] = frozenset(),
    ) -> None:
        self.status = {m: "loaded" if m == loaded else "unloaded" for m in models}
        self.broken = set(broken)
        self.calls: list[str] = []
        self.load_gate: asyncio.Event | None = None  # when set, loads wait for it
        self.load_started = asyncio.Event()

    async def load(self, model: str, timeout: float) -> bool:
        if self.status[model] == "exiting":  # like the real one: its exit comes first
            await self.exited()
        self.calls.append(f"load {model}")
        if self.status[model] == "loaded":
            return False
        self.status[model] = "loading"
        self.load_started.set()
        if self.load_gate is not None:
            await self.load_gate.wait()
        await asyncio.sleep(0)
        if model in self.broken:
            self.status[model] = "unloaded"
            raise ModelLoadError(f"model {model!r} failed to load (exit code 1)", "llama log line")
        self.status[model] = "loaded"
        return True

    async def unload(self, model: str, timeout: float, background: bool = False) -> bool:
        self.calls.append(f"unload {model}" + (" (background)" if background else ""))
        await asyncio.sleep(0)
        was = self.status[model] != "unloaded"
        self.status[model] = "exiting" if background and was else "unloaded"
        return was

    @property
    def exiting(self) -> frozenset[str]:
        return frozenset(m for m, status in self.status.items() if status == "exiting")

    async def exited(self) -> None:
        for model, status in self.status.items():
            if status == "exiting":
                self.calls.append(f"exited {model}")
                self.status[model] = "unloaded"


class FakeGpu:
    """Answers scripted used-MiB readings, one per snapshot (the last one repeats)."""

    name = "fake"

    def __init__(self, readings: list[int]) -> None:
        self.readings = readings
        self.taken = 0

    def read(self) -> GpuReading | None:
        used = self.readings[min(self.taken, len(self.readings) - 1)]
        self.taken += 1
        return GpuReading((GpuDevice(0, "Fake GPU", used, 80_000),), "fake")


class Phases:
    """A listener that records events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[SwitchEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: SwitchEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def pairs(self) -> list[tuple[str, str]]:
        return [(e.phase, e.status.value) for e in self.events]

    async def reached(self, phase: str, status: PhaseStatus = PhaseStatus.STARTED) -> None:
        while not any(e.phase == phase and e.status is status for e in self.events):
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 5)


def fake_engine(
    router: FakeRouter,
    active: str | None = "a",
    gate: TrafficGate | None = None,
    drain: float = 0.2,
    **cfg: Any,
) -> Engine:
    config = dataclasses.replace(SwitchConfig(settle_timeout_seconds=0.5), **cfg)
    engine = Engine(
        config=config,
        drain_timeout=drain,
        lifecycle=router,
        gate=gate or TrafficGate(),
        log_tail=lambda: "llama log line",
    )
    engine.active = active
    return engine


@contextlib.asynccontextmanager
async def control(engine: Engine) -> AsyncIterator[Controller]:
    """A controller with its loop running for the block (stopped as the runtime does)."""
    controller = Controller(engine, ("a", "b", "c"))
    task = asyncio.create_task(controller.run())
    try:
        yield controller
    finally:
        controller.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run(scenario: Callable[[Controller], Awaitable[_T]], engine: Engine) -> _T:
    async def main() -> _T:
        async with control(engine) as controller:
            return await scenario(controller)

    return asyncio.run(main())


def switch(engine: Engine, target: str, listener: Phases | None = None) -> SwitchReport:
    return run(lambda c: c.submit(Switch(target), listener), engine)


class FakeKv:
    """Scripted KV snapshots: what save/restore answer, and what was discarded. A save
    waits for ``save_gate`` when one is set."""

    def __init__(self, restored_tokens: int = 100, fail_save: bool = False) -> None:
        self.restored_tokens = restored_tokens
        self.fail_save = fail_save
        self.calls: list[str] = []
        self.discarded: list[str] = []
        self.save_gate: asyncio.Event | None = None
        self.info: dict[str, Any] = {}

    async def save(
        self, model: str, restoring: str | None = None, session: SessionRef | None = None
    ) -> dict[str, Any] | None:
        self.calls.append(f"save {model}")
        if self.save_gate is not None:
            await self.save_gate.wait()
        if self.fail_save:
            raise ModelLoadError("slot save answered 500")
        self.calls.append(f"saved {model}")
        return {"session": "s", "tokens": 100, "bytes": 1000, "ms": 1.0}

    async def restore(self, model: str, session: SessionRef | None = None) -> dict[str, Any] | None:
        self.calls.append(f"restore {model}" + ("" if session is None else f" for {session.id}"))
        self.info = {"restored": True, "session": "s", "tokens": self.restored_tokens}
        self.info["took"] = None
        return self.info

    def proved(self, model: str, cached: int, session_id: str | None) -> bool | None:
        self.calls.append(f"proved {model}")
        if session_id != "s":
            return None
        took = cached >= self.restored_tokens // 2
        self.info["took"] = took
        if not took:
            self.discarded.append(f"{model}: its restore did not take")
        return took

    def ensure_folder(self) -> None:
        self.calls.append("folder")

    def configure(self, config: Config) -> None:
        self.calls.append("configure")


class FakeProcess:
    def __init__(self) -> None:
        self.running = True
        self.stale = False
        self.restarts = 0

    async def restart(self) -> None:
        self.restarts += 1
        self.running = True
        self.stale = False

    def use_presets(self, presets: Presets) -> None:
        self.stale = True


RULES = Rules(max_wait=10.0, linger=0.5, min_resident=0.0)


class Clock:
    """The scheduler's clock, moved by hand (from the gate's own: monotonic seconds)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


class RecordingController:
    """Records the switches asked for; each ends as the test says."""

    def __init__(self) -> None:
        self.active: str | None = "a"
        self.asked: list[str] = []
        self.commands: list[Any] = []
        self.fail: set[str] = set()
        self.undrained: set[str] = set()  # switches to these fail at their drain
        self.busy = False  # no command queued or running between switches
        self.reports: list[SwitchReport] = []

    async def submit(self, command: Any) -> SwitchReport:
        self.asked.append(command.target)
        self.commands.append(command)
        report = SwitchReport(len(self.asked), self.active, command.target, "zero_overlap", "")
        report.phases["load"] = 400.0
        if command.target in self.undrained:
            report.outcome, report.failed_phase, report.error = Outcome.FAILED, "drain", "busy"
        elif command.target in self.fail:
            report.outcome, report.failed_phase, report.error = Outcome.FAILED, "load", "no"
        else:
            report.outcome = Outcome.OK
            self.active = command.target
        self.reports.append(report)
        return report


class NoRouter:
    """A model lifecycle with nothing to load: the in-process door tests' engine."""

    async def load(self, model: str, timeout: float) -> bool:
        return False

    async def unload(self, model: str, timeout: float, background: bool = False) -> bool:
        return False

    async def exited(self) -> None:
        return None

    @property
    def exiting(self) -> frozenset[str]:
        return frozenset()


@contextlib.asynccontextmanager
async def fake_services(
    config: Config,
    folder: Path,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    store: SessionStore | None = None,
) -> AsyncIterator[Services]:
    """A started runtime's services, in process, with ``handler`` as llama-server (the
    model ``m`` active) and a real session store (``store``, not yet open; else SQLite
    in ``folder``): for the door's tests."""
    stack = contextlib.AsyncExitStack()
    url = await stack.enter_async_context(serving(handler))
    chat_http = await stack.enter_async_context(ChatHttp(30))
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    router = RouterClient(http, url, chat_http=chat_http)
    supervisor = RouterSupervisor(config, Path("llama-server"), router, 1)
    supervisor.state = RouterState.RUNNING
    gate = TrafficGate()
    engine = Engine(config=config.switch, drain_timeout=1, lifecycle=NoRouter(), gate=gate)
    engine.active = "m"
    controller = Controller(engine, list(config.presets.models))
    try:
        async with store or SqliteStore(folder / "s.sqlite3") as opened:
            yield Services(
                config=config,
                router=router,
                supervisor=supervisor,
                events=ModelEvents(router),
                controller=controller,
                gate=gate,
                sessions=SessionService(config, opened, router),
                store=opened,
                gpu=NoGpu(),
                watchdog=Watchdog(config, supervisor, router, controller),
                idle=IdleUnloader(lambda: config.router, gate, controller),
                snapshots=None,
                feed=Feed(),
                scheduler=Scheduler(controller, gate, lambda: Rules(10, 0.5, 0), lambda: 8),
            )
    finally:
        await http.aclose()
        await stack.aclose()


def door_config(folder: Path, ini: str = "", ctx_size: int = 2048) -> Config:
    """The door's tests' config: the preset ``m`` (its file need not exist), then ``ini``'s
    sections; state under ``folder/state``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models.ini").write_text(
        "version = 1\n\n[m]\nmodel = m.gguf\n" + ini, encoding="utf-8"
    )
    (folder / "hotmodel.toml").write_text(
        '[server]\nport = 18999\nstate_dir = "state"\n\n'
        f'[router]\nmodels_preset = "models.ini"\ndefault_model = "m"\nctx_size = {ctx_size}\n',
        encoding="utf-8",
    )
    return load_config(folder / "hotmodel.toml")


class Script:
    """A scripted llama-server: what it got (each request's path and JSON body, in
    order); a test file's subclass writes ``respond``, its answer."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []

    async def handler(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.got.append((request.path, body))
        return await self.respond(request, body)

    async def respond(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        raise NotImplementedError


_Script = TypeVar("_Script", bound=Script)


def run_scripted(
    script: _Script,
    scenario: Callable[[Services, _Script], Awaitable[Any]],
    config: Config,
    store: SessionStore | None = None,
) -> None:
    """Run ``scenario`` on :func:`fake_services` with ``script`` as llama-server (state in
    ``config``'s folder; ``store``: the session store, not yet open, else SQLite there);
    no request may leave its ticket behind."""

    async def main() -> None:
        folder = config.path.parent
        async with fake_services(config, folder, script.handler, store) as services:
            await scenario(services, script)
            assert services.gate.inflight() == [], "a ticket was left behind"

    asyncio.run(main())


class AsgiClient:
    """One ASGI ``POST`` from the client's side: its JSON body (read once), the
    ``owner`` (the API key's fingerprint) the auth layer would set, what the app sent."""

    def __init__(self, path: str, body: dict[str, Any], owner: str = "") -> None:
        self.path = path
        self.body = json.dumps(body).encode()
        self.owner = owner
        self.sent: list[MutableMapping[str, Any]] = []
        self._read = False

    @property
    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "method": "POST",
            "path": self.path,
            "headers": [(b"content-type", b"application/json")],
            "state": {"owner": self.owner},
        }

    async def receive(self) -> dict[str, Any]:
        if not self._read:
            self._read = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.left()
        return {"type": "http.disconnect"}

    async def left(self) -> None:
        """Returns when the client leaves: never, unless a subclass says otherwise."""
        await asyncio.Event().wait()

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    def text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.sent).decode()

    def json(self) -> Any:
        return json.loads(self.text())
