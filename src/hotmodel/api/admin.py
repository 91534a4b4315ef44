"""Admin endpoints: ``GET /admin/status``, ``POST /admin/switch``, ``GET /admin/switches``,
``POST /admin/reload``.

``POST /admin/switch`` takes ``{"model": NAME}``. Plain, it answers the switch
report when the switch is over (200 when the target is active, 409 when
generations outlived the drain deadline and nothing changed, 500 when the switch
failed otherwise; the report says what is active now). With ``"stream": true``
it answers server-sent events as the switch goes: one ``event: phase`` per
step started/done/failed/skipped, then one ``event: report``. The switch is a
command of the control loop, so a client that disconnects does not stop it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hotmodel import __version__, sse
from hotmodel.api.chat import ACTIVE_ALIAS, parse_body
from hotmodel.api.status import health_status
from hotmodel.api.validate import read_body
from hotmodel.control.commands import Switch
from hotmodel.control.reload import reload_config
from hotmodel.control.report import SwitchEvent, SwitchReport
from hotmodel.errors import HotModelError, InvalidRequestError
from hotmodel.runtime import Runtime


def report_status(report: SwitchReport) -> int:
    """200 done; 409 when generations outlived the drain deadline (nothing was changed:
    the server is fine, the switch conflicts with work in progress); 502 any other failure
    (the model could not be made to serve: a bad file, a failed load; not a bug of ours)."""
    if not report.failed:
        return 200
    return 409 if report.drain_timed_out else 502


def _report_response(report: SwitchReport) -> Response:
    return JSONResponse(report.to_json(), status_code=report_status(report))


def status_body(runtime: Runtime) -> dict[str, Any]:
    """What ``GET /admin/status`` (and ``hotmodel status``) shows."""
    s = runtime.services
    sup = s.supervisor
    return {
        "version": __version__,
        "state": runtime.state.value,
        "health": health_status(runtime),
        "active_model": s.controller.active,
        "parked_model": s.controller.parked,  # unloaded for idleness / not preloaded
        "uptime_seconds": round(runtime.uptime(), 3),
        "config": str(s.config.path),
        "presets": list(s.config.presets.models),
        # the models loaded beside the active one (resident = true), and why one is not
        "residents": s.controller.residents.status(),
        "resident_errors": s.controller.residents.errors(),
        "router": {
            "pid": sup.pid,
            "state": sup.state.value,
            "port": sup.port,
            "url": s.router.base_url,
            "exit_code": sup.exit_code,
            "log_file": str(sup.log_file),
            "argv": sup.argv,
            "uptime_seconds": sup.uptime(),
            "events_connected": s.events.connected,
            "direct": dict(s.router.direct),  # models whose chat skips the router
            "restarts": sup.restarts,
            "recoveries": s.watchdog.recoveries,
        },
        "switch": s.controller.status(),
        "in_flight": len(s.gate.inflight()),
        # per model: admitted requests waiting for a place upstream (its slots + 1)
        "upstream_waiting": s.upstream.status(),
        # per model: requests waiting for it to be loaded, and the oldest one's wait
        "queues": s.scheduler.status(),
        "load_seconds": {m: round(v, 3) for m, v in s.scheduler.measured_load_s.items()},
        "replay_seconds": {m: round(v, 3) for m, v in s.scheduler.measured_replay_s.items()},
        "dashboard_streams": s.feed.subscribers,  # open GET /admin/events
        "gpu_probe": s.gpu.name,
        "kv_snapshots": None
        if s.snapshots is None
        else {
            "folder": str(s.config.kv_dir),
            **s.snapshots.stats(),
            "max_bytes": s.config.switch.kv_snapshot_max_bytes,
        },
        "sessions": {
            "store": str(s.store),
            "token_calls": s.sessions.token_calls,
            "busy": len(s.sessions.locks),
        },
    }


def admin_routes(runtime: Runtime) -> list[Route]:
    s = runtime.services

    async def status(request: Request) -> Response:
        return JSONResponse(status_body(runtime))

    async def switch(request: Request) -> Response:
        body = parse_body(await read_body(request, s.config.server.max_body_bytes))
        if not isinstance(body.get("model"), str):
            raise InvalidRequestError('body must be {"model": NAME}', param="model")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise InvalidRequestError("'stream' must be true or false", param="stream")
        target: str = body["model"]
        if target == ACTIVE_ALIAS and s.controller.active is not None:
            target = s.controller.active  # as on /v1: the alias names the active model
        s.controller.check_target(target)  # a 404 now, not an error event in the stream
        if not body.get("stream"):
            return _report_response(await s.controller.submit(Switch(target)))
        queue: asyncio.Queue[SwitchEvent] = asyncio.Queue()
        submitted = asyncio.ensure_future(s.controller.submit(Switch(target), queue.put_nowait))
        # A client that leaves early never reads the outcome: mark it retrieved.
        submitted.add_done_callback(lambda f: f.cancelled() or f.exception())
        return StreamingResponse(
            _progress(queue, submitted),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    async def reload(request: Request) -> Response:
        """Re-read the config files; 400 ``invalid_config`` (nothing changed) when one is bad."""
        return JSONResponse(await reload_config(s))

    async def switches(request: Request) -> Response:
        history = s.controller.history
        return JSONResponse({"data": [r.to_json() for r in reversed(history)]})

    return [
        Route("/admin/status", status, methods=["GET"]),
        Route("/admin/switch", switch, methods=["POST"]),
        Route("/admin/switches", switches, methods=["GET"]),
        Route("/admin/reload", reload, methods=["POST"]),
    ]


async def _progress(
    queue: asyncio.Queue[SwitchEvent], submitted: asyncio.Future[SwitchReport]
) -> AsyncIterator[bytes]:
    """Phase events as they come, then the report (or the error that ended the switch)."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        waits: set[asyncio.Future[Any]] = {getter, submitted}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            getter.cancel()
        if getter.done() and not getter.cancelled():
            yield sse.encode(getter.result().to_json(), "phase")
            continue
        while not queue.empty():
            yield sse.encode(queue.get_nowait().to_json(), "phase")
        try:
            report = submitted.result()
        except HotModelError as exc:
            yield sse.encode({"message": str(exc)}, "error")
        else:
            yield sse.encode(report.to_json(), "report")
        return
