"""OpenAI Responses with conversation state: ``POST /v1/responses`` (and
``/v1/responses/input_tokens``) through the same door as every inference endpoint
(``api/inference.py``), plus ``GET``/``DELETE /v1/responses/{id}`` and
``GET /v1/responses/{id}/input_items``.

llama-server answers ``/v1/responses`` itself, statelessly; hotmodel keeps the state
(``sessions/responses.py``). Before admission, a request's ``previous_response_id`` is
looked up among the key's own stored responses (another key's, or an unknown id: 404,
nothing sent) and its chain becomes the start of ``input``; the field itself is not
sent (llama-server refuses it). The answer is llama-server's, with
``previous_response_id`` added; its id is llama-server's own (no id is rewritten, in a
stream neither). With ``store`` (the default) the response is stored before the
client has it whole: a plain answer before it is sent, a stream before its
``response.completed`` event is relayed; ``store: false`` stores nothing (it cannot be
continued). ``/v1/responses/input_tokens`` resolves the chain as well, and stores
nothing.

A stored chain is a session at a switch (``sessions/responses.py``): each stored turn
keeps the chain's conversation as the session of its first response and labels the
model's slot with it, so its KV is saved when the model is switched away; a turn that
continues a chain names that session to admission (a switch it causes restores or
replays it), and its ``cache_n`` proves a restore as a chat turn does. Deleting a
response deletes that session (and its KV), which the chain's next turn writes again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hotmodel.api.auth import owner_of
from hotmodel.api.endpoints import RESPONSES
from hotmodel.api.inference import Call, Inference
from hotmodel.api.record import RequestRecord
from hotmodel.api.sessions import page_query
from hotmodel.control.snapshots import Turn as KvTurn
from hotmodel.errors import HotModelError, InvalidRequestError, ResponseNotFoundError
from hotmodel.router.chat_http import Upstream
from hotmodel.runtime import Services
from hotmodel.sessions.responses import (
    Item,
    ResponseRows,
    StoredResponse,
    chain_session,
    chat_messages,
    conversation,
    input_items,
    output_items,
)
from hotmodel.sessions.service import SessionRef
from hotmodel.sse import SseParser

RESPONSES_PATH = "/v1/responses"
COMPLETED = "response.completed"

log = logging.getLogger("hotmodel.api")


@dataclass
class Turn:
    """What a Responses request keeps between the door and its answer."""

    previous_id: str | None
    new_input: list[Item]  # this turn's own input items (what is stored)
    store: bool
    root: str | None = None  # the chain's first response (None: this turn starts one)
    sent: list[Item] | None = None  # every input item sent (the chain's, then its own)
    instructions: object = ...  # the request's (``...``: none)


def _not_found(response_id: str) -> ResponseNotFoundError:
    return ResponseNotFoundError(f"no stored response {response_id!r}", param="response_id")


class Responses(Inference):
    """The door of ``/v1/responses``, with the chain resolved and the answer stored."""

    def __init__(self, services: Services, path: str, store: ResponseRows) -> None:
        super().__init__(services, next(e for e in RESPONSES if e.path == path))
        self.store = store
        self.stores = path == RESPONSES_PATH  # input_tokens only counts

    async def prepare(self, call: Call) -> None:
        payload = call.payload
        previous = payload.pop("previous_response_id", None)
        new_input = input_items(payload["input"])
        earlier: list[Item] = []
        chain: list[StoredResponse] | None = None
        if isinstance(previous, str):
            chain = await self.store.chain(call.owner, previous)
            if chain is None:
                raise ResponseNotFoundError(
                    f"'previous_response_id': no stored response {previous!r}",
                    param="previous_response_id",
                )
            earlier = conversation(chain)
            payload["input"] = earlier + new_input
        store = self.stores and payload.get("store") is not False
        turn = Turn(previous if isinstance(previous, str) else None, new_input, store)
        turn.sent, turn.instructions = earlier + new_input, payload.get("instructions", ...)
        if chain is not None and self.stores:
            turn.root = chain[0].id
            call.session = SessionRef(chain_session(turn.root), None, call.owner)
        call.state = turn

    async def answered(self, call: Call, data: bytes) -> bytes:
        turn = call.state
        if not self.stores or not isinstance(turn, Turn):
            return data
        try:
            response = json.loads(data)
        except ValueError:
            return data  # not JSON: relayed as it came, nothing stored
        if not isinstance(response, dict) or not isinstance(response.get("id"), str):
            return data
        response["previous_response_id"] = turn.previous_id
        if turn.store:
            await self._save(call, response, turn)
        return json.dumps(response, ensure_ascii=False).encode()

    def streamed(self, call: Call, upstream: Upstream) -> Upstream:
        turn = call.state
        if not self.stores or not isinstance(turn, Turn) or not turn.store:
            return upstream
        return _Storing(upstream, self, call, turn)

    def ended(self, call: Call, record: RequestRecord) -> None:
        """The first answer after a KV restore may prove it, as a chat turn does."""
        turn, snapshots = call.state, self.s.snapshots
        if snapshots is None or record.usage is None or not isinstance(turn, Turn):
            return
        if not self.stores:
            return  # input_tokens: no slot ran it
        sent = chat_messages(turn.instructions, turn.sent or [])
        snapshots.turn_ended(
            KvTurn(
                str(call.payload.get("model")),
                call.gen,
                None if call.session is None else (call.session.owner, call.session.id),
                sent,
                record.usage.cached,
                call.payload.get("cache_prompt") is not False,
            )
        )

    async def _save(self, call: Call, response: dict[str, Any], turn: Turn) -> None:
        model = str(call.payload.get("model"))
        with anyio.CancelScope(shield=True):  # a client that leaves now does not cut it
            await self.store.save(call.owner, response, turn.previous_id, model, turn.new_input)
            await self._keep_chain(call, response, turn, model)

    async def _keep_chain(
        self, call: Call, response: dict[str, Any], turn: Turn, model: str
    ) -> None:
        """The chain's conversation, as the session a switch restores or replays."""
        items = [*(turn.sent or []), *output_items(response)]
        messages = chat_messages(turn.instructions, items)
        if messages is None:
            return  # not text: the slot stays nobody's
        session = chain_session(turn.root or str(response["id"]))
        try:
            await self.s.sessions.keep_chain(call.owner, session, messages, model, call.gen)
        except HotModelError as exc:  # the response is stored: only its KV is not kept
            log.info("the Responses chain %r is not kept as a session: %s", session, exc)


class _Storing(Upstream):
    """A stream relayed chunk by chunk, whose ``response.completed`` event is stored
    before the chunk that carries it goes on (only ``chunks`` and ``status_code`` are
    read by the relay: it wraps, it does not open, an answer)."""

    def __init__(self, inner: Upstream, door: Responses, call: Call, turn: Turn) -> None:
        self.status_code = inner.status_code
        self._inner = inner
        self._door, self._call, self._turn = door, call, turn

    async def chunks(self) -> AsyncIterator[bytes]:
        parser = SseParser()
        stored = False
        async for chunk in self._inner.chunks():
            if not stored:
                for event in parser.feed(chunk):
                    if event.event != COMPLETED and f'"{COMPLETED}"' not in event.data[:64]:
                        continue
                    try:
                        response = json.loads(event.data).get("response")
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(response, dict) and isinstance(response.get("id"), str):
                        response = {**response, "previous_response_id": self._turn.previous_id}
                        await self._door._save(self._call, response, self._turn)
                        stored = True
            yield chunk


def _items_page(stored: StoredResponse, items: list[Item], request: Request) -> dict[str, Any]:
    """``input_items`` as OpenAI lists them: ``order`` (``desc`` by default), ``limit``,
    ``after`` (an item id); an item without an id gets one from its place."""
    limit, after = page_query(request.query_params)
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("'order' must be 'asc' or 'desc'", param="order")
    listed = [
        {"id": item.get("id") or f"{stored.id}_item_{n}", **item} for n, item in enumerate(items)
    ]
    if order == "desc":
        listed.reverse()
    if after is not None:
        at = next((n for n, item in enumerate(listed) if item["id"] == after), None)
        if at is None:
            raise InvalidRequestError(f"'after': no input item {after!r}", param="after")
        listed = listed[at + 1 :]
    page = listed[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(listed) > limit,
    }


def responses_routes(services: Services) -> list[Route]:
    store = services.store.responses

    async def get_response(request: Request) -> Response:
        response_id = request.path_params["response_id"]
        stored = await store.get(owner_of(request.scope), response_id)
        if stored is None:
            raise _not_found(response_id)
        return JSONResponse(stored.response)

    async def delete_response(request: Request) -> Response:
        response_id = request.path_params["response_id"]
        owner = owner_of(request.scope)
        chain = await store.chain(owner, response_id)
        if chain is None or not await store.delete(owner, response_id):
            raise _not_found(response_id)
        # its chain's session (and KV) held its text: gone too, until the next turn
        await services.sessions.delete(owner, chain_session(chain[0].id), services.snapshots)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def list_input_items(request: Request) -> Response:
        response_id = request.path_params["response_id"]
        chain = await store.chain(owner_of(request.scope), response_id)
        if chain is None:
            raise _not_found(response_id)
        items = conversation(chain[:-1]) + chain[-1].input  # the whole input it was given
        return JSONResponse(_items_page(chain[-1], items, request))

    return [
        *(
            Route(path, Responses(services, path, store), methods=["POST"])
            for path in (e.path for e in RESPONSES)
        ),
        Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
        Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
    ]
