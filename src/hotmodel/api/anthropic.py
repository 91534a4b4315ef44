"""Anthropic's Messages API, pure: the checks of a request, its conversion to the chat
messages a session stores and back, the answer's text (plain or streamed), and errors
in Anthropic's shape.

llama-server serves ``/v1/messages`` itself (it converts to chat internally): hotmodel
forwards the request unchanged, except in a session, where the stored conversation
(chat messages) is put in front and the request sent upstream is rebuilt as Anthropic
``system`` and ``messages``. A session holds text: a session turn whose messages carry
other content blocks (images, ``tool_use``, ``tool_result``...) or that defines
``tools`` is refused (400) before anything is stored or sent.

Errors: ``{"type": "error", "error": {"type", "message"}}``, the type from the status
(:func:`error_type`); a stream's last error event is ``event: error``.
"""

from __future__ import annotations

import json
from typing import Any

from hotmodel import sse
from hotmodel.api.validate import text_length
from hotmodel.errors import InvalidRequestError
from hotmodel.sessions.reply import Message
from hotmodel.sse import SseParser

# "system": a system message in the conversation, as Claude Code (2.1.3xx) sends its
# environment notes after the first user turn; llama-server reads it as a chat system message.
ROLES = ("user", "assistant", "system")
_INT32 = 2**31 - 1
_NUMBER = (int, float)
# Anthropic's request fields and the JSON types they must have (bool is not a number).
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "max_tokens": (int,),
    "stream": (bool,),
    "system": (str, list),
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "top_k": (int,),
    "stop_sequences": (list,),
    "tools": (list,),
    "tool_choice": (dict,),
    "metadata": (dict,),
    "thinking": (dict,),
}
_KINDS = {
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    list: "an array",
    dict: "an object",
}


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _check_blocks(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _bad(f"'{where}' must be a string or an array of content blocks", where)
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad("each content block must be an object with a string 'type'", f"{where}[{i}]")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise _bad("a text block needs a string 'text'", f"{where}[{i}].text")


def check_request(
    payload: dict[str, Any], max_messages: int, budget: int | None, count: bool = False
) -> None:
    """A Messages (or ``count_tokens``, ``count``) request: each failure a 400 naming the
    field. ``budget``: the characters no model's context can hold more of (None: unknown)."""
    for name, allowed in FIELD_TYPES.items():
        value = payload.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise _bad(f"'{name}' must be {' or '.join(_KINDS[t] for t in allowed)}", name)
    max_tokens = payload.get("max_tokens")
    if isinstance(max_tokens, int) and not 1 <= max_tokens <= _INT32 and not count:
        raise _bad(f"'max_tokens' must be from 1 to {_INT32}", "max_tokens")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' is required: a non-empty array", "messages")
    if len(messages) > max_messages:
        raise _bad(f"'messages' holds more than {max_messages} messages", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad("each message must be an object", where)
        if message.get("role") not in ROLES:
            raise _bad("'role' must be 'user', 'assistant' or 'system'", f"{where}.role")
        if "content" not in message:
            raise _bad("'content' is required", f"{where}.content")
        _check_blocks(message["content"], f"{where}.content")
    if isinstance(payload.get("system"), list):
        _check_blocks(payload["system"], "system")
    stops = payload.get("stop_sequences")
    if isinstance(stops, list) and not all(isinstance(s, str) for s in stops):
        raise _bad("'stop_sequences' must be an array of strings", "stop_sequences")
    for i, tool in enumerate(payload.get("tools") or ()):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise _bad("each tool must be an object with a string 'name'", f"tools[{i}]")
    size = text_length([payload.get("system"), messages, payload.get("tools")])
    if budget is not None and size > budget:
        raise _bad(
            f"the request holds {size} characters of text: more than any model's context "
            f"can hold, whatever its tokenizer (at most {budget})",
            "messages",
        )


# --- sessions: Anthropic <-> the stored chat messages ---


def _text(content: Any, where: str) -> str:
    """A content's text: a string, or text blocks only (else 400: a session stores text)."""
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.get("type") != "text":
            raise _bad(
                f"a session holds text: a {block.get('type')!r} block cannot be stored; "
                "send it without X-Session-Id",
                f"{where}[{i}]",
            )
        parts.append(block["text"])
    return "".join(parts)


def to_chat(payload: dict[str, Any]) -> list[Message]:
    """A checked request's ``system`` and ``messages`` as chat messages (a session turn)."""
    if payload.get("tools"):
        raise _bad("a session holds text conversations: send tools without X-Session-Id", "tools")
    out: list[Message] = []
    system = payload.get("system")
    if system:
        out.append({"role": "system", "content": _text(system, "system")})
    for i, message in enumerate(payload["messages"]):
        content = _text(message["content"], f"messages[{i}].content")
        out.append({"role": message["role"], "content": content})
    return out


def _chat_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's text parts (a chat turn of the same session)
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def from_chat(messages: list[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """The prompt a session built (chat messages) as Anthropic's ``system`` (the system
    messages, joined) and ``messages`` (user and assistant turns, text; a tool turn a
    chat request of the same session stored is its text, as the user's)."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        text = _chat_text(message.get("content"))
        if role in ("system", "developer"):
            system.append(text)
            continue
        role = "assistant" if role == "assistant" else "user"
        if out and out[-1]["role"] == role:  # Anthropic alternates: one turn each
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    return ("\n\n".join(system) if system else None), out


def reply_of(data: bytes) -> Message | None:
    """The assistant message of a plain answer (its text blocks), None when unreadable."""
    try:
        answer = json.loads(data)
        blocks = answer["content"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(blocks, list):
        return None
    text = "".join(
        b["text"]
        for b in blocks
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
    )
    return {"role": "assistant", "content": text}


class StreamAssembler:
    """Feed it a Messages stream's bytes; :meth:`message` is the answer once
    ``message_stop`` came (none after an error event: a cut answer is not stored)."""

    def __init__(self) -> None:
        self._parser = SseParser()
        self._text: list[str] = []
        self.stopped = False
        self.error = False

    def feed(self, chunk: bytes) -> None:
        for event in self._parser.feed(chunk):
            try:
                payload = event.json()
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            kind = payload.get("type")
            if kind == "error" or "error" in payload or event.event == "error":
                self.error = True
            elif kind == "content_block_delta":
                delta = payload.get("delta")
                if isinstance(delta, dict) and delta.get("type") == "text_delta":
                    text = delta.get("text")
                    if isinstance(text, str):
                        self._text.append(text)
            elif kind == "message_stop":
                self.stopped = True

    def message(self) -> Message | None:
        if not self.stopped or self.error:
            return None
        return {"role": "assistant", "content": "".join(self._text)}


# --- errors ---

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str) -> bytes:
    return json.dumps(
        {"type": "error", "error": {"type": error_type(status), "message": message}},
        ensure_ascii=False,
    ).encode()


def message_of(body: bytes) -> str:
    """The message of an error answer in OpenAI's (or llama-server's) shape."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or "error"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and data.get("type") != "error":
            return str(error.get("message") or "error")
        if isinstance(error, dict):
            return str(error.get("message") or "error")
        if isinstance(error, str):
            return error
    return "error"


def reshape_error(status: int, body: bytes) -> bytes:
    """An error answer (any shape) in Anthropic's; one already in it is kept."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("type") == "error":
        return body
    return error_body(status, message_of(body))


def _event_status(error: dict[str, Any]) -> int:
    """The status an error event stands for (its OpenAI ``code``/``type``)."""
    code = error.get("code")
    if isinstance(code, int):
        return code
    if error.get("type") == "invalid_request_error":
        return 400
    if code in ("switch_cancelled", "shutting_down", "model_unavailable"):
        return 503
    return 500


def reshape_events(chunk: bytes) -> bytes:
    """A stream's error events in OpenAI's shape (``data: {"error": ...}``, what hotmodel
    sends when a stream cannot finish) as Anthropic's ``event: error``."""
    if b'data: {"error"' not in chunk:
        return chunk
    out = []
    for line in chunk.split(b"\n"):
        if line.startswith(b'data: {"error"'):
            try:
                error = json.loads(line[6:])["error"]
            except (ValueError, KeyError, TypeError):
                out.append(line)
                continue
            if isinstance(error, dict):
                status = _event_status(error)
                body = error_body(status, str(error.get("message") or "error"))
                out.append(sse.encode(body, event="error").rstrip(b"\n"))
                continue
        out.append(line)
    return b"\n".join(out)
