"""``GET /health``, ``GET /v1/models`` and ``/v1/models/{id}``: what is loaded, and whether
requests are served now."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hotmodel.api.chat import ACTIVE_ALIAS
from hotmodel.api.endpoints import served_by
from hotmodel.api.errors import RETRY_AFTER_S
from hotmodel.control.report import SwitchState
from hotmodel.errors import ModelNotFoundError, RouterError
from hotmodel.presets import Preset
from hotmodel.router.supervisor import RouterState
from hotmodel.runtime import Runtime, ServiceState


def health_status(runtime: Runtime) -> str:
    """One word for ``/health``: ``ok`` only while requests are served at once.

    ``switching`` while a switch holds requests at the gate (zero_overlap, no
    model loaded), ``recovering`` while the router or model is brought back
    after a crash, ``failed`` when the router could not be restarted,
    ``router_exited`` when it died and restarts are off, ``idle`` when the model
    was unloaded for idleness (served: the next request loads it back; 200),
    ``unavailable`` when no model is loaded or hotmodel is starting or stopping.
    """
    s = runtime.services
    router = s.supervisor.state
    if runtime.state is not ServiceState.READY:
        return "unavailable"
    if router is RouterState.FAILED:
        return "failed"
    if s.controller.state is SwitchState.RECOVERING or (
        router is RouterState.EXITED and s.watchdog.enabled
    ):
        return "recovering"
    if router is not RouterState.RUNNING:
        return "router_exited"
    if not s.gate.is_open:
        return "switching"
    if s.controller.active is None:
        return "idle" if s.controller.parked is not None else "unavailable"
    return "ok"


def size_on_disk(preset: Preset) -> int | None:
    """The size of the preset's ``model`` file on disk (the first file of a split GGUF), or
    None when it has no local file or the file is gone. One stat per preset: cheap enough
    for every listing."""
    if preset.model_path is None:
        return None
    try:
        return preset.model_path.stat().st_size
    except OSError:
        return None


# the router's words for a model that serves nothing now, whatever the controller says
_NOT_SERVING = frozenset({"unloaded", "unloading", "loading", "failed"})


def really_active(active: str | None, states: dict[str, str]) -> str | None:
    """The model that serves requests now: the controller's active model, unless the
    router says it is not loaded. A zero_overlap switch unloads the active model before
    it activates the next one; in between no model is active (requests wait for the
    switch), and ``hotmodel models`` must not mark the unloaded one. With no answer
    from the router (``states`` empty) the controller's word stands."""
    if active is None or states.get(active) in _NOT_SERVING:
        return None
    return active


def status_routes(runtime: Runtime) -> list[Route]:
    s = runtime.services

    async def health(request: Request) -> Response:
        """200 only while requests are served at once; else 503 with Retry-After and why."""
        status = health_status(runtime)
        body = {
            "status": status,
            "state": runtime.state.value,
            "router": s.supervisor.state.value,
            "active_model": s.controller.active,
            "switching": s.controller.busy,
            "switch_state": s.controller.state.value,
            "parked_model": s.controller.parked,
        }
        served = status in ("ok", "idle")
        resp = JSONResponse(body, status_code=200 if served else 503)
        if not served:
            resp.headers["retry-after"] = RETRY_AFTER_S
        return resp

    async def model_objects() -> list[dict[str, object]]:
        try:
            states = {k: v.state.value for k, v in (await s.router.models()).items()}
        except RouterError:
            states = {}
        parked = s.controller.parked
        residents = s.controller.residents.names
        for name in s.controller.exiting:
            if states.get(name) == "loaded":  # the router says so until its process is gone
                states[name] = "unloading"
        active = really_active(s.controller.active, states)
        return [
            {
                "id": name,
                "object": "model",
                "owned_by": "hotmodel",
                "created": 0,
                "status": states.get(name, "unknown"),
                "active": name == active,
                "parked": name == parked,  # unloaded for idleness: the next request loads it
                "resident": name in residents,  # loaded beside the active one, never switched
                "size_bytes": size_on_disk(preset),
                "endpoints": served_by(preset, s.config),  # what it answers (api/endpoints.py)
            }
            for name, preset in s.config.presets.models.items()
        ]

    async def list_models(request: Request) -> Response:
        data = await model_objects()
        active = next((m["id"] for m in data if m["active"]), None)
        return JSONResponse(
            {"object": "list", "data": data, "active": active, "alias": ACTIVE_ALIAS}
        )

    async def get_model(request: Request) -> Response:
        """OpenAI's "retrieve model": one preset, or the active one for the alias."""
        name = request.path_params["model_id"]
        if name == ACTIVE_ALIAS:  # as chat reads it: the active model, else the parked one
            name = s.controller.active or s.controller.parked or ""
            if not name:
                raise ModelNotFoundError("no model is active (none is loaded)", "model")
        for model in await model_objects():
            if model["id"] == name:
                return JSONResponse(model)
        raise ModelNotFoundError.not_a_preset(name, [ACTIVE_ALIAS, *s.config.presets.models])

    return [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    ]
