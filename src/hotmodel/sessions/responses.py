"""Stored OpenAI Responses: the conversation state llama-server does not keep.

llama-server's ``/v1/responses`` is stateless (it refuses ``previous_response_id``);
hotmodel keeps each response answered with ``store`` (the default) in the session
store (table ``responses``: SQLite's schema version 5, PostgreSQL's first): its owner (the API key's
fingerprint), its id (llama-server's own ``resp_...``: no id is rewritten), the
response it continued, the new input items of its turn and the response object. A
request with ``previous_response_id`` gets the whole chain as its input: every earlier
turn's input items and output items, oldest first, then its own (:func:`conversation`,
pure). The chain is read from disk, so it survives switches and restarts.

Deleting a response keeps the responses that continued it continuable: its own items
are folded into theirs (they take its input and output as the start of their own input
and point to its predecessor), in one transaction.

The queries are each backend's (:class:`ResponseRows`: ``SqliteResponses`` in
:mod:`hotmodel.sessions.sqlite`, ``PostgresResponses`` in
:mod:`hotmodel.sessions.postgres`); :class:`ResponseStore` is what the API uses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Item = dict[str, Any]
# The output items a later turn takes as its input (llama-server reads these back)
CONTEXT_TYPES = frozenset({"message", "function_call", "function_call_output"})
# A chain longer than this is refused rather than walked (a loop in a damaged file)
MAX_CHAIN = 100_000


def input_items(value: object) -> list[Item]:
    """A request's ``input`` as Responses input items (a string is one user message)."""
    if isinstance(value, str):
        return [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        ]
    if isinstance(value, list):
        return [dict(item) for item in value if isinstance(item, dict)]
    return []


def output_items(response: dict[str, Any]) -> list[Item]:
    """The items of a response's ``output`` that a later turn takes as input."""
    output = response.get("output")
    if not isinstance(output, list):
        return []
    return [i for i in output if isinstance(i, dict) and i.get("type") in CONTEXT_TYPES]


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    previous_id: str | None
    model: str
    input: list[Item]  # this turn's new input items
    response: dict[str, Any]  # the response object, as answered
    created_at: float


def conversation(chain: Sequence[StoredResponse]) -> list[Item]:
    """Every item of ``chain`` (oldest first) in order: each turn's input, then its output."""
    items: list[Item] = []
    for turn in chain:
        items += turn.input
        items += output_items(turn.response)
    return items


def from_row(row: Sequence[Any]) -> StoredResponse:
    rid, previous, model, raw_input, raw_response, created = row
    return StoredResponse(
        rid, previous, model, json.loads(raw_input), json.loads(raw_response), created
    )


COLUMNS = "id, previous_id, model, input, response, created_at"


class ResponseRows(Protocol):
    """One backend's queries of the responses table (same behaviour on each)."""

    async def get(self, owner: str, response_id: str) -> StoredResponse | None: ...

    async def chain(self, owner: str, response_id: str) -> list[StoredResponse] | None: ...

    async def save(
        self,
        owner: str,
        response: dict[str, Any],
        previous_id: str | None,
        model: str,
        new_input: list[Item],
    ) -> None: ...

    async def delete(self, owner: str, response_id: str) -> bool: ...


class HasResponses(Protocol):
    """A session store: each keeps its responses beside its sessions."""

    @property
    def responses(self) -> ResponseRows: ...


def folded(gone: StoredResponse, child_input: str) -> str:
    """A child's new ``input`` (JSON) once ``gone``, the response it continued, is
    deleted: ``gone``'s input and output first, then its own."""
    return json.dumps(conversation([gone]) + json.loads(child_input), ensure_ascii=False)


def encode(items: list[Item] | dict[str, Any]) -> str:
    return json.dumps(items, ensure_ascii=False)


class ResponseStore:
    """The stored responses of a session store, whichever its backend."""

    def __init__(self, store: HasResponses) -> None:
        self.rows = store.responses

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        return await self.rows.get(owner, response_id)

    async def chain(self, owner: str, response_id: str) -> list[StoredResponse] | None:
        """``response_id`` and every response before it, oldest first (None: no such id)."""
        return await self.rows.chain(owner, response_id)

    async def save(
        self,
        owner: str,
        response: dict[str, Any],
        previous_id: str | None,
        model: str,
        new_input: list[Item],
    ) -> None:
        await self.rows.save(owner, response, previous_id, model, new_input)

    async def delete(self, owner: str, response_id: str) -> bool:
        """Delete one response; those that continued it take its items (see the module)."""
        return await self.rows.delete(owner, response_id)
