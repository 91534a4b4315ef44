"""llama-server's inference endpoints besides chat, as one table, and what each accepts.

Each :class:`Endpoint` says where it goes upstream, whether it streams,
whether it generates (a length bound applies), whether it reuses a slot's
prompt cache (then another API key's slot is used with ``cache_prompt:
false``: ``sessions/tenants.py``), whether it runs in a slot at all (its
prompt replaces what the slot held: a session's KV label is dropped), which
kind of model serves it, and its checks: pure, each failure a 400 naming the
field, before anything is admitted or sent (what llama-server would answer
with a 500, or a parse error, or not at all). Fields the checks do not know
pass through untouched.

Which model: the body's ``model`` field, as for chat (``"active"``, omitted, a
preset); llama.cpp's native endpoints (``/completion``, ``/infill``,
``/tokenize``...) have no such field of their own, so without one they go to
the active model.

Which presets serve what (:func:`served_by`, shown on ``/v1/models``): one
started with ``embeddings`` (llama-server's ``--embeddings``: an embedding
model only) serves the embedding endpoints and the tokenizer, plus rerank when
its ``pooling`` is ``rank`` (or it sets ``rerank``); any other serves chat,
completions, infill and the tokenizer endpoints. An embedding or rerank request
for a preset that cannot serve it is refused (400 ``unsupported_endpoint``)
before it could cause a switch; llama-server would answer 501.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from hotmodel.api.validate import check_messages, text_length
from hotmodel.config import Config
from hotmodel.control.fit import largest_context
from hotmodel.errors import InvalidRequestError, UnsupportedEndpointError
from hotmodel.presets import Preset

CHAT_PATH = "/v1/chat/completions"
# No tokenizer makes fewer than one token of this many characters (validate.py's bound)
_CHARS_PER_TOKEN = 64
_INT32 = 2**31 - 1


class Family(Enum):
    """What kind of model serves an endpoint."""

    COMPLETION = "completion"  # a generating (chat) model
    TEMPLATE = "template"  # a chat model's template
    TOKENIZER = "tokenizer"  # any model
    EMBEDDING = "embedding"  # a preset with `embeddings`
    RERANK = "rerank"  # an embedding preset with `pooling = rank` (or `rerank`)


Check = Callable[[dict[str, Any], Config], None]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One of llama-server's inference endpoints, as hotmodel serves it."""

    path: str  # hotmodel's route (llama-server's path: the same)
    family: Family
    check: Check
    summary: str
    streams: bool = False  # `stream: true` answers server-sent events
    generates: bool = False  # [server] default_max_tokens applies
    slot_cache: bool = False  # reuses a slot's prompt cache: the tenants' rules apply
    in_slot: bool = False  # runs in a slot: what the slot held is gone
    openai_fields: bool = True  # the OpenAI parameters' types are checked (chat's)


# --- checks (pure) ---


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _text_budget(config: Config) -> int | None:
    """The characters no model's context can hold more of (None: a context is unknown)."""
    context = largest_context(config.presets, config.router)
    return None if context is None else context * _CHARS_PER_TOKEN


def _check_size(value: Any, param: str, config: Config) -> None:
    budget = _text_budget(config)
    n = text_length(value)
    if budget is not None and n > budget:
        raise _bad(
            f"'{param}' holds {n} characters of text: more than any model's context can "
            f"hold, whatever its tokenizer (at most {budget})",
            param,
        )


def _check_token(value: Any, param: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT32:
        raise _bad(f"'{param}' must hold token ids (integers from 0 to {_INT32})", param)


def _check_prompt(payload: dict[str, Any], name: str, config: Config) -> None:
    """A prompt as llama-server reads one: a string, an array of token ids and strings,
    or an array of such prompts (one answer each; objects: multimodal prompts)."""
    if name not in payload or payload[name] is None:
        raise _bad(f"'{name}' is required", name)
    value = payload[name]
    if isinstance(value, str):
        _check_size(value, name, config)
        return
    if not isinstance(value, list) or not value:
        raise _bad(f"'{name}' must be a string or a non-empty array", name)
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if isinstance(item, list):
            for j, part in enumerate(item):
                if not isinstance(part, str):
                    _check_token(part, f"{where}[{j}]")
        elif isinstance(item, int | bool):
            _check_token(item, where)
        elif not isinstance(item, str | dict):
            raise _bad(f"'{where}' must be a string, a token id, an array or an object", where)
    _check_size(value, name, config)


def _check_types(payload: dict[str, Any], types: Mapping[str, tuple[type, ...]]) -> None:
    for name, allowed in types.items():
        value = payload.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            kinds = " or ".join(_KINDS[t] for t in allowed)
            raise _bad(f"'{name}' must be {kinds}", name)


_KINDS = {
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    list: "an array",
    dict: "an object",
}
_NATIVE_TYPES: dict[str, tuple[type, ...]] = {
    "n_predict": (int,),
    "cache_prompt": (bool,),
    "id_slot": (int,),
    "n_probs": (int,),
    "top_k": (int,),
    "min_p": (int, float),
}


def check_completion(payload: dict[str, Any], config: Config) -> None:
    _check_prompt(payload, "prompt", config)
    _check_types(payload, {**_NATIVE_TYPES, "echo": (bool,), "suffix": (str,)})


def check_infill(payload: dict[str, Any], config: Config) -> None:
    for name in ("input_prefix", "input_suffix"):
        if not isinstance(payload.get(name), str):
            raise _bad(f"'{name}' is required: a string", name)
    _check_types(payload, {**_NATIVE_TYPES, "prompt": (str,), "input_extra": (list,)})
    for i, chunk in enumerate(payload.get("input_extra") or ()):
        if (
            not isinstance(chunk, dict)
            or not isinstance(chunk.get("text"), str)
            or not isinstance(chunk.get("filename", ""), str)
        ):
            raise _bad(
                "each 'input_extra' entry must be an object with a string 'text' "
                "(and a string 'filename')",
                f"input_extra[{i}]",
            )
    _check_size([payload.get(k) for k in ("input_prefix", "input_suffix", "input_extra")],
                "input_prefix", config)  # fmt: skip


def check_tokenize(payload: dict[str, Any], config: Config) -> None:
    _check_prompt(payload, "content", config)
    _check_types(
        payload, {"add_special": (bool,), "parse_special": (bool,), "with_pieces": (bool,)}
    )


def check_detokenize(payload: dict[str, Any], config: Config) -> None:
    tokens = payload.get("tokens")
    if not isinstance(tokens, list):
        raise _bad("'tokens' is required: an array of token ids", "tokens")
    for i, token in enumerate(tokens):
        _check_token(token, f"tokens[{i}]")


def check_template(payload: dict[str, Any], config: Config) -> None:
    if "messages" not in payload:
        raise _bad("'messages' is required", "messages")
    check_messages(payload["messages"], config.server.max_messages)
    _check_size(payload["messages"], "messages", config)


def check_embeddings(payload: dict[str, Any], config: Config) -> None:
    # OpenAI's field is `input`; llama-server's own /embedding(s) also reads `content`
    name = "input" if "input" in payload or "content" not in payload else "content"
    _check_prompt(payload, name, config)
    _check_types(payload, {"encoding_format": (str,), "embd_normalize": (int,)})
    fmt = payload.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")


def check_rerank(payload: dict[str, Any], config: Config) -> None:
    if not isinstance(payload.get("query"), str):
        raise _bad("'query' is required: a string", "query")
    documents = payload.get("documents")
    if not isinstance(documents, list) or not documents:
        raise _bad("'documents' is required: a non-empty array of strings", "documents")
    for i, document in enumerate(documents):
        if not isinstance(document, str):
            raise _bad("each document must be a string", f"documents[{i}]")
    _check_types(payload, {"top_n": (int,), "return_text": (bool,)})
    top_n = payload.get("top_n")
    if isinstance(top_n, int) and not isinstance(top_n, bool) and top_n < 1:
        raise _bad("'top_n' must be 1 or more", "top_n")
    _check_size([payload["query"], documents], "documents", config)


def check_responses(payload: dict[str, Any], config: Config) -> None:
    """OpenAI Responses: ``input`` a string or an array of items (objects); hotmodel's own
    fields (``previous_response_id``, ``store``) typed (api/responses.py reads them); the
    Responses fields typed, and ``tools`` in the Responses shape (each an object with a
    string ``type``: ``function`` with its ``name`` at the top, not chat's nested
    ``function``; Codex also sends ``namespace``, ``web_search``... which llama-server
    takes and does not use). Codex's other fields (``reasoning``, ``include``,
    ``store: false``, ``parallel_tool_calls``, ``prompt_cache_key``, ``client_metadata``)
    pass through: llama-server 11434 accepts them."""
    if "input" not in payload or payload["input"] is None:
        raise _bad("'input' is required", "input")
    value = payload["input"]
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise _bad("each 'input' item must be an object", f"input[{i}]")
    elif not isinstance(value, str):
        raise _bad("'input' must be a string or an array of items", "input")
    _check_types(
        payload,
        {
            "previous_response_id": (str,),
            "store": (bool,),
            "instructions": (str,),
            "max_output_tokens": (int,),
            "model": (str,),
            "stream": (bool,),
            "temperature": (float, int),
            "top_p": (float, int),
            "tools": (list,),
            "tool_choice": (str, dict),
            "parallel_tool_calls": (bool,),
            "include": (list,),
            "reasoning": (dict,),
            "text": (dict,),
            "user": (str,),
        },
    )
    for i, tool in enumerate(payload.get("tools") or ()):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise _bad("each tool must be an object with a string 'type'", f"tools[{i}]")
    if payload.get("previous_response_id") == "":
        raise _bad("'previous_response_id' must be a response id", "previous_response_id")
    _check_size([value, payload.get("instructions")], "input", config)


# --- the table ---


def _completion(path: str, summary: str, check: Check = check_completion) -> Endpoint:
    return Endpoint(
        path, Family.COMPLETION, check, summary, True, True, slot_cache=True, in_slot=True
    )


def _embedding(path: str, family: Family, check: Check, summary: str) -> Endpoint:
    return Endpoint(path, family, check, summary, in_slot=True)


ENDPOINTS: tuple[Endpoint, ...] = (
    _completion("/v1/completions", "OpenAI text completion"),
    _completion("/completion", "llama.cpp's native completion"),
    _completion("/completions", "llama.cpp's native completion (/completion's alias)"),
    _completion("/infill", "code infilling (fill in the middle)", check_infill),
    Endpoint("/tokenize", Family.TOKENIZER, check_tokenize, "text to token ids"),
    Endpoint("/detokenize", Family.TOKENIZER, check_detokenize, "token ids to text"),
    Endpoint("/apply-template", Family.TEMPLATE, check_template, "a chat, templated"),
    _embedding("/v1/embeddings", Family.EMBEDDING, check_embeddings, "OpenAI embeddings"),
    _embedding("/embeddings", Family.EMBEDDING, check_embeddings, "llama.cpp's embeddings"),
    _embedding(
        "/embedding", Family.EMBEDDING, check_embeddings, "llama.cpp's embeddings (older name)"
    ),
    _embedding("/v1/rerank", Family.RERANK, check_rerank, "rerank documents for a query"),
    _embedding("/rerank", Family.RERANK, check_rerank, "rerank (/v1/rerank's alias)"),
    _embedding("/v1/reranking", Family.RERANK, check_rerank, "rerank (/v1/rerank's alias)"),
    _embedding("/reranking", Family.RERANK, check_rerank, "rerank (/v1/rerank's alias)"),
)
# OpenAI Responses, served by api/responses.py's subclass of the door (the stored
# conversation state); not (yet) among the endpoints /v1/models lists per preset.
RESPONSES: tuple[Endpoint, ...] = (
    Endpoint(
        "/v1/responses",
        Family.COMPLETION,
        check_responses,
        "OpenAI Responses (stored: api/responses.py)",
        True,
        True,
        slot_cache=True,
        in_slot=True,
        openai_fields=False,  # Responses' own shapes (tools, text...): check_responses
    ),
    Endpoint(
        "/v1/responses/input_tokens",
        Family.TEMPLATE,
        check_responses,
        "the input tokens a Responses request would take",
        openai_fields=False,
    ),
)
RESPONSES_PATHS = frozenset(e.path for e in RESPONSES)
# The routes outside /v1 that need a client key, as /v1 does (api/auth.py).
NATIVE_PATHS = frozenset(e.path for e in ENDPOINTS if not e.path.startswith("/v1/"))


# --- which preset serves what ---

_TRUE = frozenset({"on", "enabled", "true", "1"})  # llama-server's truthy flag values


def _flag(options: Sequence[Mapping[str, str]], *keys: str) -> bool:
    for own in options:
        for key in keys:
            if key in own:
                return own[key].strip().lower() in _TRUE
    return False


def families(preset: Preset, config: Config) -> frozenset[Family]:
    """What ``preset`` serves, from its options (then ``[*]``'s, then ``[router]
    extra_args``): an embedding model the embedding families, else the generating ones."""
    options = (preset.options, config.presets.globals)
    args = config.router.extra_args
    rerank = _flag(options, "rerank", "reranking") or any(
        a in ("--rerank", "--reranking") for a in args
    )
    embedding = (
        rerank
        or _flag(options, "embeddings", "embedding")
        or any(a in ("--embedding", "--embeddings") for a in args)
    )
    if not embedding:
        return frozenset({Family.COMPLETION, Family.TEMPLATE, Family.TOKENIZER})
    pooling = next((o["pooling"] for o in options if "pooling" in o), "")
    served = {Family.EMBEDDING, Family.TOKENIZER}
    if rerank or pooling.strip().lower() == "rank":
        served.add(Family.RERANK)
    return frozenset(served)


# Anthropic Messages and its token count: served by api/messages.py, beside this table
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def served_by(preset: Preset, config: Config) -> list[str]:
    """The routes ``preset`` serves, chat first (``/v1/models``' ``endpoints``)."""
    served = families(preset, config)
    # chat, and Anthropic Messages (api/messages.py: llama-server's own conversion of it)
    chat = [CHAT_PATH, ANTHROPIC_PATHS[0]] if Family.COMPLETION in served else []
    tokens = [ANTHROPIC_PATHS[1]] if Family.COMPLETION in served else []
    # OpenAI Responses (api/responses.py), stored: what llama-server converts to chat
    responses = [e.path for e in RESPONSES if e.family in served]
    return chat + [e.path for e in ENDPOINTS if e.family in served] + tokens + responses


def check_serves(endpoint: Endpoint, model: object, config: Config) -> None:
    """Refuse an embedding or rerank request for a preset that cannot answer it (400):
    llama-server would answer 501, after a switch to it. Other mismatches are left to
    llama-server (a guess from the options could be wrong)."""
    if endpoint.family not in (Family.EMBEDDING, Family.RERANK) or not isinstance(model, str):
        return
    preset = config.presets.models.get(model)
    if preset is None or endpoint.family in families(preset, config):
        return
    needs = "`embeddings = true`" + (
        " and `pooling = rank`" if endpoint.family is Family.RERANK else ""
    )
    raise UnsupportedEndpointError(
        f"model {model!r} does not serve {endpoint.path}: its preset needs {needs} "
        "(see /v1/models: each model's endpoints)",
        param="model",
    )
