"""``GET /health`` and ``GET /v1/models``: what is loaded, and whether requests are served now."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hotmodel.api.chat import ACTIVE_ALIAS
from hotmodel.api.errors import RETRY_AFTER_S
from hotmodel.errors import RouterError
from hotmodel.runtime import Runtime, ServiceState


def status_routes(runtime: Runtime) -> list[Route]:
    s = runtime.services

    async def health(request: Request) -> Response:
        """200 only while requests are served at once: ready, a model active, gate open.

        During a zero_overlap switch the gate is closed (requests wait): 503
        ``switching`` with Retry-After, as the README promises.
        """
        active = s.controller.active
        if runtime.state is not ServiceState.READY or active is None:
            status = "unavailable"
        elif not s.gate.is_open:
            status = "switching"
        else:
            status = "ok"
        body = {
            "status": status,
            "state": runtime.state.value,
            "active_model": active,
            "switching": s.controller.busy,
            "switch_state": s.controller.state.value,
        }
        resp = JSONResponse(body, status_code=200 if status == "ok" else 503)
        if status != "ok":
            resp.headers["retry-after"] = RETRY_AFTER_S
        return resp

    async def list_models(request: Request) -> Response:
        try:
            states = {k: v.state.value for k, v in (await s.router.models()).items()}
        except RouterError:
            states = {}
        active = s.controller.active
        data = [
            {
                "id": name,
                "object": "model",
                "owned_by": "hotmodel",
                "created": 0,
                "status": states.get(name, "unknown"),
                "active": name == active,
            }
            for name in s.config.presets.models
        ]
        return JSONResponse(
            {"object": "list", "data": data, "active": active, "alias": ACTIVE_ALIAS}
        )

    return [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
    ]
