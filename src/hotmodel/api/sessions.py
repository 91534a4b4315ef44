"""Session endpoints: ``GET /v1/sessions``, ``GET`` and ``DELETE /v1/sessions/{id}``.

With API keys, each key sees only the sessions it created.
``GET /v1/sessions`` pages as OpenAI's lists do: ``limit`` (default 100, at
most 1000) and ``after`` (a session id: the page after it), most recently
used first, ties by id; the answer says ``has_more`` and ``first_id`` /
``last_id``. ``GET /v1/sessions/{id}`` is the export: the session with every
stored message (the OpenAI message object plus the model that produced it and
the time), as JSON, and ``system_prompt_missing`` when the config no longer
defines its system prompt. A Responses chain's session (``responses resp_...``:
``sessions/responses.py``) is listed, exported and deleted as any.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hotmodel.api.auth import owner_of
from hotmodel.control.snapshots import Snapshots
from hotmodel.errors import InvalidRequestError, SessionNotFoundError
from hotmodel.sessions.service import SessionService
from hotmodel.sessions.store import SessionStore

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def page_query(query: Mapping[str, str]) -> tuple[int, str | None]:
    """``limit`` and ``after`` of a list request (400 naming the bad one)."""
    raw = query.get("limit")
    limit = DEFAULT_LIMIT
    if raw is not None:
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequestError(
                f"'limit' must be an integer from 1 to {MAX_LIMIT} (got {raw!r})", param="limit"
            )
    after = query.get("after")
    if after is not None and not after:
        raise InvalidRequestError("'after' must be a session id", param="after")
    return limit, after


def session_routes(sessions: SessionService, snapshots: Snapshots | None) -> list[Route]:
    store: SessionStore = sessions.store

    async def list_sessions(request: Request) -> Response:
        limit, after = page_query(request.query_params)
        page = await store.page(owner_of(request.scope), limit, after)
        if page is None:
            raise InvalidRequestError(f"'after': no session {after!r}", param="after")
        data = [s.to_json() for s in page.sessions]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": page.has_more,
            }
        )

    async def get_session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        sessions.check_stored(session_id)  # an id no session can have: 400, as for DELETE
        session = await store.get(owner_of(request.scope), session_id)
        if session is None:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return JSONResponse(
            {**session.to_json(), "system_prompt_missing": sessions.prompt_missing(session)}
        )

    async def delete_session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        owner = owner_of(request.scope)
        sessions.check_stored(session_id)
        if not await sessions.delete(owner, session_id, snapshots):
            raise SessionNotFoundError(f"no session {session_id!r}")
        return JSONResponse({"id": session_id, "deleted": True})

    return [
        Route("/v1/sessions", list_sessions, methods=["GET"]),
        Route("/v1/sessions/{session_id:path}", get_session, methods=["GET"]),
        Route("/v1/sessions/{session_id:path}", delete_session, methods=["DELETE"]),
    ]
