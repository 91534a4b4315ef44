"""``GET /openapi.json``: an OpenAPI 3.0 description of hotmodel's own endpoints.

Written by hand from the routes and the checks in ``validate.py``, so it
describes what hotmodel accepts (llama-server's extra chat fields pass through
and are allowed by ``additionalProperties``). Schema-driven fuzzing in the test
suite (schemathesis) uses it to look for 5xx answers.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hotmodel import __version__
from hotmodel.api.endpoints import ENDPOINTS, RESPONSES, RESPONSES_PATHS, Family
from hotmodel.api.validate import ROLES

_ERROR = {"$ref": "#/components/schemas/Error"}


def _answers(ok: dict[str, Any], *codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": ok}}}
    for code in codes:
        out[str(code)] = {
            "description": "an error, in OpenAI's shape",
            "content": {"application/json": {"schema": _ERROR}},
        }
    return out


_OBJECT = {"schema": {"type": "object"}}
_FAILED_SWITCH = {
    "description": "the failed switch's report (its error, failed_phase, what is active now)",
    "content": {"application/json": _OBJECT},
}
_SESSION_ID = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
}
_PAGE = [
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": "sessions per page",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    },
    {
        "name": "after",
        "in": "query",
        "required": False,
        "description": "a session id (a page's last_id): the page after it",
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    },
]

_MODEL_ID = {
    "name": "model_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": "string", "nullable": True},
                    "code": {"type": "string", "nullable": True},
                },
            }
        },
    },
    "Message": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "enum": sorted(ROLES)},
            "content": {
                "nullable": True,
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type"],
                            "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
                        },
                    },
                ],
            },
            "name": {"type": "string"},
            "tool_call_id": {"type": "string"},
        },
    },
    "ChatRequest": {
        "type": "object",
        "required": ["messages"],
        "additionalProperties": True,
        "properties": {
            "model": {"type": "string", "description": '"active", a preset, or omitted'},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/components/schemas/Message"},
            },
            "stream": {"type": "boolean"},
            "max_tokens": {"type": "integer"},
            "temperature": {"type": "number"},
            "top_p": {"type": "number"},
            "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "session_id": {
                "type": "string",
                "description": "keep this conversation (also X-Session-Id)",
            },
            "system_prompt": {
                "type": "string",
                "description": "a [system_prompts.NAME] for the session",
            },
        },
    },
}


_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_PROMPT = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"oneOf": [{"type": "string"}, _TOKENS]}},
    ]
}
_MODEL = {"type": "string", "description": '"active", a preset, or omitted (the active one)'}
_GENERATION = {
    "model": _MODEL,
    "stream": {"type": "boolean"},
    "max_tokens": {"type": "integer"},
    "n_predict": {"type": "integer"},
    "temperature": {"type": "number"},
}
# Each family's request body, as api/endpoints.py checks it.
INFERENCE_SCHEMAS: dict[Family, dict[str, Any]] = {
    Family.COMPLETION: {"required": ["prompt"], "properties": {"prompt": _PROMPT, **_GENERATION}},
    Family.TOKENIZER: {
        "properties": {
            "model": _MODEL,
            "content": {"type": "string"},
            "tokens": _TOKENS,
            "add_special": {"type": "boolean"},
            "with_pieces": {"type": "boolean"},
        }
    },
    Family.TEMPLATE: {
        "required": ["messages"],
        "properties": {
            "model": _MODEL,
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/components/schemas/Message"},
            },
        },
    },
    Family.EMBEDDING: {
        "required": ["input"],
        "properties": {
            "model": _MODEL,
            "input": _PROMPT,
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        },
    },
    Family.RERANK: {
        "required": ["query", "documents"],
        "properties": {
            "model": _MODEL,
            "query": {"type": "string"},
            "documents": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "top_n": {"type": "integer", "minimum": 1},
        },
    },
}
_INFILL = {
    "required": ["input_prefix", "input_suffix"],
    "properties": {
        "input_prefix": {"type": "string"},
        "input_suffix": {"type": "string"},
        "input_extra": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["text"],
                "properties": {"filename": {"type": "string"}, "text": {"type": "string"}},
            },
        },
        "prompt": {"type": "string"},
        **_GENERATION,
    },
}


_RESPONSES = {
    "required": ["input"],
    "properties": {
        "model": _MODEL,
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "previous_response_id": {
            "type": "string",
            "description": "a stored response of the same key: its conversation comes first",
        },
        "store": {"type": "boolean", "default": True},
        "instructions": {"type": "string"},
        "max_output_tokens": {"type": "integer"},
        "stream": {"type": "boolean"},
        "temperature": {"type": "number"},
    },
}
_RESPONSE_ID = {
    "name": "response_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}


def _responses_paths() -> dict[str, Any]:
    """The stored responses (api/responses.py)."""
    return {
        "/v1/responses/{response_id}": {
            "parameters": [_RESPONSE_ID],
            "get": {
                "summary": "a stored response",
                "responses": _answers(_OBJECT, 401, 404),
            },
            "delete": {
                "summary": "delete a stored response (those that continued it stay continuable)",
                "responses": _answers(_OBJECT, 401, 404),
            },
        },
        "/v1/responses/{response_id}/input_items": {
            "parameters": [_RESPONSE_ID],
            "get": {
                "summary": "the input items a stored response was given, the earlier turns' "
                "included (order, limit, after)",
                "responses": _answers(_OBJECT, 400, 401, 404),
            },
        },
    }


def _inference_paths() -> dict[str, Any]:
    """Every endpoint of api/endpoints.py's table."""
    paths: dict[str, Any] = {}
    for e in (*ENDPOINTS, *RESPONSES):
        body = _INFILL if e.path == "/infill" else INFERENCE_SCHEMAS[e.family]
        if e.path in RESPONSES_PATHS:
            body = _RESPONSES
        if e.path == "/detokenize":
            body = {"required": ["tokens"], "properties": {"model": _MODEL, "tokens": _TOKENS}}
        elif e.family is Family.TOKENIZER:
            body = {**body, "required": ["content"]}
        schema = {"type": "object", "additionalProperties": True, **body}
        paths[e.path] = {
            "post": {
                "summary": e.summary + (", plain or streamed (SSE)" if e.streams else ""),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": schema}},
                },
                "responses": _answers(_OBJECT, 400, 401, 404, 408, 409, 413, 502, 503, 504),
            }
        }
    return paths


_ANTHROPIC_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
    },
}
_ANTHROPIC = {
    "type": "object",
    "additionalProperties": True,
    "required": ["model", "messages"],
    "properties": {
        "model": _MODEL,
        "messages": {"type": "array", "items": _ANTHROPIC_MESSAGE},
        "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "max_tokens": {"type": "integer", "minimum": 1},
        "stream": {"type": "boolean"},
        "tools": {"type": "array", "items": {"type": "object"}},
    },
}


def _anthropic_paths() -> dict[str, Any]:
    """Anthropic Messages (api/messages.py); errors there are in Anthropic's shape."""
    answers = _answers(_OBJECT, 400, 401, 404, 413, 429, 503)
    body = {"required": True, "content": {"application/json": {"schema": _ANTHROPIC}}}
    messages = {
        "summary": "Anthropic Messages, plain or streamed (SSE); errors in Anthropic's shape",
        "requestBody": body,
        "responses": answers,
    }
    count = {"summary": "Anthropic Messages: count the prompt's tokens", "requestBody": body}
    return {
        "/v1/messages": {"post": messages},
        "/v1/messages/count_tokens": {"post": {**count, "responses": answers}},
    }


def spec() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "hotmodel",
            "version": __version__,
            "description": "A control plane for llama.cpp's llama-server: OpenAI-compatible chat, "
            "sessions that survive model switches, and the switch itself.",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": _paths(),
    }


def _paths() -> dict[str, Any]:
    return {
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI chat completion, plain or streamed (SSE)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}
                    },
                },
                "responses": _answers(_OBJECT, 400, 401, 404, 408, 409, 413, 502, 503, 504),
            }
        },
        **_inference_paths(),
        **_anthropic_paths(),
        **_responses_paths(),
        "/v1/models": {"get": {"summary": "the presets", "responses": _answers(_OBJECT, 401)}},
        "/v1/models/{model_id}": {
            "parameters": [_MODEL_ID],
            "get": {
                "summary": "one preset ('active': the active one)",
                "responses": _answers(_OBJECT, 401, 404),
            },
        },
        "/v1/sessions": {
            "get": {
                "summary": "sessions, most recently used first (ties by id), a page at a time "
                "(has_more, first_id, last_id)",
                "parameters": _PAGE,
                "responses": _answers(_OBJECT, 400, 401),
            }
        },
        "/v1/sessions/{session_id}": {
            "parameters": [_SESSION_ID],
            "get": {
                "summary": "one session (export)",
                "responses": _answers(_OBJECT, 400, 401, 404),
            },
            "delete": {
                "summary": "delete a session",
                "responses": _answers(_OBJECT, 400, 401, 404),
            },
        },
        "/health": {"get": {"summary": "200 when serving", "responses": _answers(_OBJECT, 503)}},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (admin key when keys are set)",
                "responses": {
                    **_answers(_OBJECT, 401, 403),
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                },
            }
        },
        "/admin/status": {"get": {"summary": "state", "responses": _answers(_OBJECT, 401, 403)}},
        "/admin/switches": {
            "get": {"summary": "switch history", "responses": _answers(_OBJECT, 401, 403)}
        },
        "/admin/reload": {
            "post": {
                "summary": "re-read the config files (400 invalid_config: nothing changed)",
                "responses": _answers(_OBJECT, 400, 401, 403),
            }
        },
        "/openapi.json": {"get": {"summary": "this document", "responses": _answers(_OBJECT)}},
        **_dashboard_paths(),
        "/admin/switch": {
            "post": {
                "summary": "switch the active model",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["model"],
                                "properties": {
                                    "model": {"type": "string"},
                                    "stream": {"type": "boolean"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    **_answers(_OBJECT, 400, 401, 403, 404, 503),
                    "409": _FAILED_SWITCH,  # generations outlived the drain: nothing changed
                    "502": _FAILED_SWITCH,
                },
            }
        },
    }


def _dashboard_paths() -> dict[str, Any]:
    """The dashboard's page, its live feed and the router's log tail (api/ui.py)."""
    events = {"description": "server-sent events", "content": {"text/event-stream": _OBJECT}}
    page = {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}
    return {
        "/ui": {
            "get": {
                "summary": "the dashboard (static; data needs keys)",
                "responses": {"200": page},
            }
        },
        "/admin/events": {
            "get": {
                "summary": "live feed: status, phase, report, model, resync events (never ends)",
                "responses": {**_answers(_OBJECT, 401, 403), "200": events},
            }
        },
        "/admin/logs": {
            "get": {
                "summary": "the router log's last lines",
                "parameters": [
                    {
                        "name": "lines",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 5000},
                    }
                ],
                "responses": _answers(_OBJECT, 400, 401, 403),
            }
        },
    }


def openapi_routes() -> list[Route]:
    document = spec()  # built once

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    return [Route("/openapi.json", openapi, methods=["GET"])]
