"""Bad input stops at the door: pure checks of a request body, each failure a 400 naming
the field, before anything is admitted, stored or sent to llama-server.

- the body: size (``[server] max_body_bytes``, 413 before it is read whole),
  JSON, nesting depth, lone surrogates (they cannot be stored or forwarded),
  no ``NaN``/``Infinity`` (not JSON, refused by every peer);
- the chat fields hotmodel or llama-server would trip over: ``messages`` (at
  most ``[server] max_messages``, each an object with a known string ``role``,
  ``content`` a string or an array of typed parts, well-formed ``tool_calls``),
  and the types of the common OpenAI parameters.

Unknown fields pass through untouched: llama-server has many extras.
:func:`read_body` is the one async piece: it reads at most the limit.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from hotmodel.errors import (
    ContextLengthError,
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from hotmodel.sessions.context import chars

MAX_DEPTH = 64
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Integers llama-server reads as 32-bit (a larger one wraps around); -1 means "no limit".
# llama-server answers one choice per request.
_INT32_MAX = 2**31 - 1
INT_RANGES: dict[str, tuple[int, int]] = {
    "max_tokens": (-1, _INT32_MAX),
    "max_completion_tokens": (-1, _INT32_MAX),
    "n": (1, 1),
    "top_logprobs": (0, 20),
}
# OpenAI chat parameters and the JSON types they must have (bool is not a number here).
_NUMBER = (int, float)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "stream": (bool,),
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "n": (int,),
    "seed": (int,),
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "frequency_penalty": _NUMBER,
    "presence_penalty": _NUMBER,
    "logprobs": (bool,),
    "top_logprobs": (int,),
    "stop": (str, list),
    "tools": (list,),
    "tool_choice": (str, dict),
    "parallel_tool_calls": (bool,),
    "response_format": (dict,),
    "stream_options": (dict,),
    "logit_bias": (dict,),
    "user": (str,),
}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``."""
    return await read_asgi_body(request.receive, request.headers.get("content-length", ""), limit)


# A client that announced a body and stops sending it would hold its connection and its
# coroutine for ever (uvicorn's own timeouts cover only the time between requests).
BODY_TIMEOUT_S = 60.0


async def read_asgi_body(
    receive: Receive, declared: str, limit: int, timeout: float = BODY_TIMEOUT_S
) -> bytes:
    """:func:`read_body` on the ASGI messages themselves (``declared``: the Content-Length
    header, or ''); a client that leaves raises Starlette's ``ClientDisconnect``, one that
    has not sent the whole body within ``timeout`` seconds gets a 408."""
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _too_large(size, limit)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {timeout:g}s ({size} bytes came)"
        ) from None


def _too_large(size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"request body is larger than {limit} bytes ({size} or more; [server] max_body_bytes)"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is too large for a number")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)


def parse_json(body: bytes) -> Any:
    """Decode a request body, refusing what JSON does not allow (or cannot be sent on).

    As ``json.loads`` reads bytes (the encoding detected, surrogates let through for
    :func:`check_tree` to refuse), with one decoder made once instead of per call.
    """
    try:
        return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except RecursionError:
        raise InvalidRequestError(
            f"request body is nested too deeply (at most {MAX_DEPTH} levels)"
        ) from None
    except ValueError as exc:  # includes UnicodeDecodeError
        if "int_max_str_digits" in str(exc):  # Python's own advice is not the client's
            raise InvalidRequestError("request body has a number with too many digits") from None
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None


# A lone surrogate comes from a JSON escape, or from its UTF-8-like bytes (ED A0..BF),
# which the decoder lets through as json.loads does.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def parse_body(body: bytes) -> dict[str, Any]:
    """A JSON object body, checked for depth and unencodable strings (400 otherwise)."""
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    if tree_needs_check(body):
        check_tree(payload)
    return payload


def tree_needs_check(body: bytes) -> bool:
    """Whether :func:`check_tree` can find anything in what ``body`` decodes to: a few
    byte searches in C instead of a walk over every value of every request."""
    return (
        body.count(b"{") + body.count(b"[") >= MAX_DEPTH
        or _SURROGATE.search(body) is not None
        or json.detect_encoding(body) not in ("utf-8", "utf-8-sig")  # UTF-16/32: walk it
    )


def check_tree(value: Any) -> None:
    """Nesting depth and strings that cannot be encoded (lone surrogates), iteratively."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(
                    "request body contains a lone surrogate (\\ud800-\\udfff) in a string"
                ) from None
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise InvalidRequestError(
                f"request body is nested too deeply (at most {MAX_DEPTH} levels)"
            )
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(key, str):
                stack.append((key, depth))
            stack.append((child, depth + 1))


def check_fields(payload: dict[str, Any]) -> None:
    for name, types in FIELD_TYPES.items():
        value = payload.get(name)
        if value is None:  # absent or null: the default
            continue
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            kinds = " or ".join(_kind(t) for t in types)
            raise InvalidRequestError(f"'{name}' must be {kinds}", param=name)
    for name, (low, high) in INT_RANGES.items():
        value = payload.get(name)
        if isinstance(value, int) and not low <= value <= high:
            span = f"{low}" if low == high else f"from {low} to {high}"
            raise InvalidRequestError(f"'{name}' must be {span}", param=name)
    stop = payload.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError("'stop' must be a string or an array of strings", param="stop")
    tools = payload.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
                raise InvalidRequestError(
                    "each tool must be an object with a 'function' object", param=f"tools[{i}]"
                )


def _kind(t: type) -> str:
    return {
        str: "a string",
        bool: "true or false",
        int: "an integer",
        float: "a number",
        list: "an array",
        dict: "an object",
    }[t]


def check_messages(messages: Any, max_messages: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array", param="messages")
    if len(messages) > max_messages:
        raise InvalidRequestError(
            f"'messages' has {len(messages)} entries; at most {max_messages} "
            "([server] max_messages)",
            param="messages",
        )
    for i, message in enumerate(messages):
        _check_message(message, f"messages[{i}]")


# No tokenizer makes fewer than one token of this many characters of text: a prompt
# with more characters than this many per token of context cannot fit in it.
MAX_CHARS_PER_TOKEN = 64


def check_prompt_length(messages: list[Any], context: int | None) -> None:
    """Refuse a prompt whose text could not fit in ``context`` tokens whatever the
    tokenizer, before llama-server spends seconds tokenizing it (a 7 MB prompt: 2.3 s
    on a 2-core CPU) to say so. ``None``: a context is unknown, nothing is refused."""
    if context is None:
        return
    limit = context * MAX_CHARS_PER_TOKEN
    n = chars(messages)  # the messages are checked by check_messages already
    if n > limit:
        raise ContextLengthError(
            f"the messages hold {n} characters of text: more than any model's context "
            f"({context} tokens) can hold, whatever its tokenizer (at most {limit})",
            param="messages",
        )


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise InvalidRequestError("each message must be an object", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRequestError(
            f"'role' must be one of {', '.join(sorted(ROLES))}", param=f"{where}.role"
        )
    content = message.get("content")
    if content is None:
        calls = message.get("tool_calls") or message.get("function_call")
        if role != "assistant" or not calls:
            raise InvalidRequestError(
                "'content' is required (null only for an assistant message with tool calls)",
                param=f"{where}.content",
            )
    elif isinstance(content, list):
        _check_parts(content, f"{where}.content")
    elif not isinstance(content, str):
        raise InvalidRequestError(
            "'content' must be a string or an array of content parts", param=f"{where}.content"
        )
    for key in ("name", "tool_call_id", "reasoning_content"):
        if key in message and message[key] is not None and not isinstance(message[key], str):
            raise InvalidRequestError(f"'{key}' must be a string", param=f"{where}.{key}")
    if message.get("tool_calls") is not None:
        _check_tool_calls(message["tool_calls"], f"{where}.tool_calls")


def _check_parts(parts: Sequence[Any], where: str) -> None:
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequestError(
                "each content part must be an object with a string 'type'", param=f"{where}[{j}]"
            )
        text = part.get("text")
        if (part["type"] == "text" or text is not None) and not isinstance(text, str):
            raise InvalidRequestError(
                "a part's 'text' must be a string", param=f"{where}[{j}].text"
            )


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise InvalidRequestError("'tool_calls' must be an array", param=where)
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments", ""), str)
        ):
            raise InvalidRequestError(
                "a tool call needs a 'function' with a string 'name' and string 'arguments'",
                param=f"{where}[{k}]",
            )


def text_length(value: Any) -> int:
    """The characters of text in a JSON value (keys aside)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_length(v) for v in value)
    if isinstance(value, dict):
        return sum(text_length(v) for v in value.values())
    return 0
