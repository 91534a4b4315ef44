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

A stored chain is also a session, for what sessions get at a switch: its conversation,
as the chat messages llama-server makes of it (:func:`chat_messages`, pure), is kept
as the session :func:`chain_session` (the owner's, named by the chain's first
response), rewritten whole by each stored turn (a chain may branch), so a switch away
and back restores its KV snapshot or replays it like any session's. A turn whose
items llama-server would not read as text, tool calls and tool results is not one.

The queries are each backend's (:class:`ResponseRows`: ``SqliteResponses`` in
:mod:`hotmodel.sessions.sqlite`, ``PostgresResponses`` in
:mod:`hotmodel.sessions.postgres`), reached as the store's ``responses``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hotmodel.sessions.context import Message
from hotmodel.sessions.records import CHAIN_PREFIX

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


def chain_session(root_id: str) -> str:
    """The session id of the chain that starts with the response ``root_id``."""
    return CHAIN_PREFIX + root_id


class _NotTextError(Exception):
    """An item llama-server would not read as text, a tool call or a tool result."""


def _text_parts(content: object, kind: str) -> list[Message]:
    """A message item's content as chat text parts (a string: one ``input_text``)."""
    if isinstance(content, str):
        content = [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise _NotTextError
    parts: list[Message] = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != kind:
            raise _NotTextError  # an image, a file: not replayed as text
        if not isinstance(part.get("text"), str):
            raise _NotTextError
        parts.append({"text": part["text"], "type": "text"})
    return parts


def _assistant(messages: list[Message]) -> Message:
    """The assistant message a reply item joins: the last one, else a new one."""
    if not messages or messages[-1].get("role") != "assistant":
        messages.append({"role": "assistant"})
    return messages[-1]


def chat_messages(instructions: object, items: Sequence[Item]) -> list[Message] | None:
    """The chat messages llama-server makes of a Responses request's ``instructions``
    (``...`` when the request had none) and ``input`` items, as its
    ``convert_responses_to_chatcmpl`` does: ``instructions`` a system message; text
    content as text parts; an assistant's text, tool calls and reasoning joining the
    assistant message before them; a tool result a ``tool`` message. None when an item
    is anything else (an image, a file...): that turn is not a session's."""
    messages: list[Message] = []
    if instructions is not ...:
        text = instructions if isinstance(instructions, str) else ""
        messages.append({"role": "system", "content": text})
    try:
        for item in items:
            messages += _chat_message(item, messages)
    except _NotTextError:
        return None
    return messages


def _chat_message(item: Item, messages: list[Message]) -> list[Message]:
    """``item`` as chat messages to append (none: it joined the last one)."""
    role, kind = item.get("role"), item.get("type")
    if role in ("user", "system", "developer") and "content" in item:
        return [{"role": role, "content": _text_parts(item["content"], "input_text")}]
    if role == "assistant" and kind == "message":
        parts = _text_parts(item.get("content"), "output_text")
        _assistant(messages).setdefault("content", []).extend(parts)
        return []
    if kind == "function_call":
        if not all(isinstance(item.get(k), str) for k in ("arguments", "call_id", "name")):
            raise _NotTextError
        call = {
            "function": {"arguments": item["arguments"], "name": item["name"]},
            "id": item["call_id"],
            "type": "function",
        }
        _assistant(messages).setdefault("tool_calls", []).append(call)
        return []
    if kind == "function_call_output" and isinstance(item.get("call_id"), str):
        output = item.get("output")
        if not isinstance(output, str):
            output = _text_parts(output, "input_text")
        return [{"content": output, "role": "tool", "tool_call_id": item["call_id"]}]
    raise _NotTextError


def from_row(row: Sequence[Any]) -> StoredResponse:
    rid, previous, model, raw_input, raw_response, created = row
    return StoredResponse(
        rid, previous, model, json.loads(raw_input), json.loads(raw_response), created
    )


COLUMNS = "id, previous_id, model, input, response, created_at"


class ResponseRows(Protocol):
    """The stored responses of a session store (``store.responses``): one backend's
    queries of the responses table, the same behaviour on each."""

    async def get(self, owner: str, response_id: str) -> StoredResponse | None: ...

    async def chain(self, owner: str, response_id: str) -> list[StoredResponse] | None:
        """``response_id`` and every response before it, oldest first (None: no such id)."""
        ...

    async def save(
        self,
        owner: str,
        response: dict[str, Any],
        previous_id: str | None,
        model: str,
        new_input: list[Item],
    ) -> None: ...

    async def delete(self, owner: str, response_id: str) -> bool:
        """Delete one response; those that continued it take its items (see the module)."""
        ...


def folded(gone: StoredResponse, child_input: str) -> str:
    """A child's new ``input`` (JSON) once ``gone``, the response it continued, is
    deleted: ``gone``'s input and output first, then its own."""
    return json.dumps(conversation([gone]) + json.loads(child_input), ensure_ascii=False)


def encode(items: list[Item] | dict[str, Any]) -> str:
    return json.dumps(items, ensure_ascii=False)
