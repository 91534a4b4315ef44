"""Admin endpoints: ``GET /admin/status``, ``POST /admin/switch``, ``GET /admin/switches``.

``POST /admin/switch`` takes ``{"model": NAME}``. Plain, it answers the switch
report when the switch is over (200 when the target is active, 500 when the
switch failed; the report says what is active now). With ``"stream": true``
it answers server-sent events as the switch goes: one ``event: phase`` per
step started/done/failed/skipped, then one ``event: report``. A switch runs as
a task of the runtime, so a client that disconnects does not stop it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hotmodel import __version__
from hotmodel.errors import InvalidRequestError, RouterUnavailableError
from hotmodel.runtime import Runtime
from hotmodel.switch import SwitchEngine, SwitchEvent, SwitchReport


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _report_response(report: SwitchReport) -> Response:
    return JSONResponse(report.to_json(), status_code=500 if report.outcome == "failed" else 200)


def admin_routes(runtime: Runtime) -> list[Route]:
    def engine() -> SwitchEngine:
        if runtime.engine is None:
            raise RouterUnavailableError("hotmodel is not started")
        return runtime.engine

    async def status(request: Request) -> Response:
        sup = runtime.supervisor
        router: dict[str, Any] = {}
        if sup is not None:
            router = {
                "pid": sup.pid,
                "state": sup.state.value,
                "port": sup.port,
                "url": runtime.router.base_url if runtime.router else None,
                "exit_code": sup.exit_code,
                "log_file": str(sup.log_file),
                "argv": sup.argv,
                "uptime_seconds": sup.uptime(),
            }
        return JSONResponse(
            {
                "version": __version__,
                "state": runtime.state.value,
                "active_model": runtime.active_model,
                "uptime_seconds": round(runtime.uptime(), 3),
                "config": str(runtime.config.path),
                "presets": list(runtime.config.presets.models),
                "router": router,
                "switch": engine().status() if runtime.engine else None,
                "gpu_probe": runtime.gpu.name,
                "sessions": {
                    "store": str(runtime.config.session_store_file),
                    "token_calls": runtime.sessions.token_calls if runtime.sessions else 0,
                },
            }
        )

    async def switch(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise InvalidRequestError('body must be {"model": NAME}', param="model")
        target: str = body["model"]
        eng = engine()
        eng.check_target(target)  # a 404 now, not an error event in the stream
        if not body.get("stream"):
            return _report_response(await runtime.switch(target))

        queue: asyncio.Queue[SwitchEvent] = asyncio.Queue()
        task = runtime.spawn(eng.switch(target, queue.put_nowait))

        async def events() -> AsyncIterator[bytes]:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield _sse("phase", getter.result().to_json())
                    continue
                getter.cancel()
                while not queue.empty():
                    yield _sse("phase", queue.get_nowait().to_json())
                if task.exception() is not None:
                    yield _sse("error", {"message": str(task.exception())})
                else:
                    yield _sse("report", task.result().to_json())
                return

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    async def switches(request: Request) -> Response:
        return JSONResponse({"data": [r.to_json() for r in reversed(engine().history)]})

    return [
        Route("/admin/status", status, methods=["GET"]),
        Route("/admin/switch", switch, methods=["POST"]),
        Route("/admin/switches", switches, methods=["GET"]),
    ]
