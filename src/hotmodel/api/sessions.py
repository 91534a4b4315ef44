"""Session endpoints: ``GET /v1/sessions``, ``GET`` and ``DELETE /v1/sessions/{id}``.

With API keys, each key sees only the sessions it created.
``GET /v1/sessions/{id}`` is the export: the session with every stored
message (the OpenAI message object plus the model that produced it and the
time), as JSON.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hotmodel.api.auth import owner_of
from hotmodel.control.snapshots import Snapshots
from hotmodel.errors import SessionNotFoundError
from hotmodel.sessions.service import SessionService
from hotmodel.sessions.store import SessionStore


def session_routes(sessions: SessionService, snapshots: Snapshots | None) -> list[Route]:
    store: SessionStore = sessions.store
    wait = sessions.config.session.queue_timeout_seconds

    async def list_sessions(request: Request) -> Response:
        listed = await store.list(owner_of(request.scope))
        return JSONResponse({"object": "list", "data": [s.to_json() for s in listed]})

    async def get_session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        sessions.check(session_id, None)  # an id no session can have: 400, as for DELETE
        session = await store.get(owner_of(request.scope), session_id)
        if session is None:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return JSONResponse(session.to_json())

    async def delete_session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        owner = owner_of(request.scope)
        ref = sessions.check(session_id, None, owner)
        async with sessions.locks.hold(ref.lock_key, wait):  # not in the middle of a turn
            deleted = await store.delete(owner, session_id)
            sessions.slots.forget(owner, session_id)  # no slot is saved under its name again
            if snapshots is not None:  # its KV goes with it
                await asyncio.to_thread(snapshots.forget_session, owner, session_id)
        if not deleted:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return JSONResponse({"id": session_id, "deleted": True})

    return [
        Route("/v1/sessions", list_sessions, methods=["GET"]),
        Route("/v1/sessions/{session_id:path}", get_session, methods=["GET"]),
        Route("/v1/sessions/{session_id:path}", delete_session, methods=["DELETE"]),
    ]
