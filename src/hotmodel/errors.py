"""The one exception hierarchy of hotmodel.

Every error hotmodel raises on purpose is a ``HotModelError``; library errors
(httpx and aiohttp in ``router/boundary.py``, OSError from process spawning,
tomllib) are translated into these at the boundary that calls the library,
with ``raise ... from exc``.

    HotModelError
    ├── ConfigError                  a config file is missing, unreadable or invalid
    ├── RouterError                  anything about the managed llama-server router
    │   ├── RouterBinaryError        the llama-server binary cannot be found or started
    │   ├── RouterStartError         the router did not become healthy before its deadline
    │   ├── RouterExitedError        the router process exited while it was needed
    │   ├── RouterUnavailableError   the router cannot be reached (connect failure, broken answer)
    │   │   └── RouterRefusedError   no connection could be made: nothing was sent (may be resent)
    │   ├── RouterTimeoutError       the router was reached but did not answer in time (504)
    │   ├── RouterProtocolError      the router answered something we cannot use
    │   ├── ModelUnavailableError    the model's own process is gone; it is loaded again (503)
    │   └── ModelLoadError           a model ended `failed` or missed its load deadline
    ├── RequestError                 an HTTP client sent something we refuse (maps to 4xx)
    │   ├── InvalidRequestError      malformed JSON, missing or wrong fields (400)
    │   ├── PayloadTooLargeError     the body is over [server] max_body_bytes (413)
    │   ├── RequestTimeoutError      the body did not arrive in time (408)
    │   ├── ContextLengthError       a prompt no model's context could hold (400)
    │   ├── UnsupportedEndpointError the model named does not serve the endpoint (400)
    │   ├── ModelNotFoundError       the model is not a preset (404)
    │   ├── ModelNotActiveError      the model is a preset but not the active one (409)
    │   ├── AutoSwitchForbiddenError a client key asked for a switch it may not cause (403)
    │   ├── SessionNotFoundError     no session has this id (404)
    │   ├── ResponseNotFoundError    no stored response has this id (404)
    │   ├── SessionBusyError         another request on the session outlived the wait (409)
    │   ├── SessionLimitError        a new session past [session] max_sessions_per_key (409)
    │   └── SessionFullError         a turn past [session] max_stored_messages (409)
    ├── SwitchError                  a model switch did not complete
    │   ├── SwitchBusyError          a request waited past its bound for a switch (503)
    │   ├── SwitchCancelledError     a generation was cancelled to let a switch go on (503)
    │   └── SwitchFailedError        a switch failed; carries its report (502)
    ├── StoreError                   the session store cannot be opened or used (SQLite, PostgreSQL)
    │   └── StoreUnavailableError    PostgreSQL cannot be reached: nothing was written (503)
    ├── ClusterError                 the cluster's local PostgreSQL or another node cannot be used
    │   ├── PeerUnreachableError     a peer gave no answer's head (the request may go elsewhere)
    │   └── PeerLostError            a peer's answer broke off (what was relayed stays relayed)
    ├── SlotBusyError                another API key's request held the slot too long (503)
    ├── QueueFullError               [switch] max_queue requests already wait (429)
    ├── ShuttingDownError            hotmodel is stopping and takes no new work (503)
    └── ProvisionError               setting up llama-server or the models failed

``http_error_for`` maps any of them to the HTTP status and OpenAI error
``type``/``code`` used by the proxy, so that mapping lives in one place.

Each error has a public message (``public``: what failed, in a user's words,
which is all an HTTP client is sent) and may carry a private ``detail``: the
library's exception text, addresses, paths. ``str()`` gives both, for the
server log and the admin reports; ``api/errors.py`` sends only ``public`` and
logs the detail once, with the request's id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class HotModelError(Exception):
    """Base of every error hotmodel raises on purpose.

    ``detail`` is for the server log only (never sent to a client): the foreign
    exception's text, an address, a path.
    """

    def __init__(self, *args: object, detail: str | None = None) -> None:
        super().__init__(*args)
        self.detail = detail

    @property
    def public(self) -> str:
        """The message a client may read (no detail)."""
        return str(self.args[0]) if self.args else type(self).__name__

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.detail})" if self.detail else text


def detail_of(exc: BaseException) -> str:
    """A library's error as the server log shows it: its type, and its text if it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ConfigError(HotModelError):
    """A config file is missing, unreadable or invalid.

    The message always names the file, and where it applies the section and key.
    """

    def __init__(
        self, path: object, message: str, section: str | None = None, key: str | None = None
    ) -> None:
        where = str(path)
        if section is not None:
            where += f" [{section}]"
            if key is not None:
                where += f" {key}"
        elif key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.section = section
        self.key = key


class RouterError(HotModelError):
    """Something about the managed llama-server router went wrong."""


class RouterBinaryError(RouterError):
    """The llama-server binary cannot be found or started."""


class RouterStartError(RouterError):
    """The router did not become healthy before its deadline."""


class RouterExitedError(RouterError):
    """The router process exited while it was needed."""


class RouterUnavailableError(RouterError):
    """The router could not be reached."""


class RouterRefusedError(RouterUnavailableError):
    """No connection to llama-server could be made (refused, unreachable): it never saw
    the request, so the caller may send it again once llama-server is back."""


class RouterTimeoutError(RouterError):
    """The router was reached but did not answer within the deadline that the message names."""


class RouterProtocolError(RouterError):
    """The router answered with something hotmodel cannot use."""


class ModelUnavailableError(RouterError):
    """The loaded model's own llama-server process is gone (it crashed, or was killed);
    the control loop loads it again, so a client is asked to retry (503)."""


class ResidentUnavailableError(ModelUnavailableError):
    """A resident model (``resident = true``) is not loaded: its load failed, or it is being
    loaded (again). The message says which; the rest of hotmodel works (503)."""


class ModelLoadError(RouterError):
    """A model load ended ``failed`` or did not reach ``loaded`` in time.

    ``summary`` says what happened; ``log_tail`` holds the router log's last
    lines (where llama.cpp says why). ``str()`` gives both.
    """

    def __init__(self, summary: str, log_tail: str = "") -> None:
        message = summary
        if log_tail:
            message += f"\n--- llama-server log tail ---\n{log_tail}"
        super().__init__(message)
        self.summary = summary
        self.log_tail = log_tail

    @property
    def public(self) -> str:
        return self.summary  # the log tail may name files: the server log has it


class RequestError(HotModelError):
    """An HTTP client sent a request that hotmodel refuses."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequestError(RequestError):
    """Malformed JSON or missing/wrong fields."""


class PayloadTooLargeError(RequestError):
    """The request body is larger than the configured limit."""


class RequestTimeoutError(RequestError):
    """The client did not send its whole request body in time."""


class UnsupportedEndpointError(RequestError):
    """The model named does not serve the endpoint (an embedding request for a chat model)."""


class ContextLengthError(RequestError):
    """The prompt's text is too long for any preset's context, whatever the tokenizer."""


class ModelNotFoundError(RequestError):
    """The requested model is not one of the presets."""

    @classmethod
    def not_a_preset(cls, name: object, known: Iterable[str]) -> ModelNotFoundError:
        """The one wording of it, with the names that would have been taken."""
        return cls(f"model {name!r} is not a preset (known: {', '.join(known)})", param="model")


class ModelResidentError(RequestError):
    """A switch named a resident model: it stays loaded beside the active one and is
    served directly, never switched to."""


class ModelNotActiveError(RequestError):
    """The requested model is a preset, but not the active one."""


class SessionNotFoundError(RequestError):
    """No session has this id."""


class ResponseNotFoundError(RequestError):
    """No stored response has this id (for this API key)."""


class SessionBusyError(RequestError):
    """Another request on the same session is still running past the wait bound."""


class SessionLimitError(RequestError):
    """A request would create a session past ``[session] max_sessions_per_key``."""

    @classmethod
    def reached(cls, limit: int) -> SessionLimitError:
        """The one wording of it: the bound, and how to make room."""
        return cls(
            f"no new session: {limit} sessions are stored for this API key, the bound "
            "([session] max_sessions_per_key); delete one (DELETE /v1/sessions/{id}, or "
            "`hotmodel sessions delete ID`) to make room, or go on with an existing one",
            param="session_id",
        )


class SessionFullError(RequestError):
    """A turn would make a session store more than ``[session] max_stored_messages``."""

    @classmethod
    def over(cls, session_id: str, total: int, limit: int) -> SessionFullError:
        """The one wording of it: the bound, and what to do instead."""
        return cls(
            f"session {session_id!r} is full: this turn would store {total} messages, over "
            f"the bound of {limit} ([session] max_stored_messages); nothing was stored. "
            "Start a new session (export this one first with GET /v1/sessions/{id} if "
            "needed), or delete it (DELETE /v1/sessions/{id}) to free its id",
            param="session_id",
        )


class AutoSwitchForbiddenError(RequestError):
    """A client key named another model while ``[switch] auto_access = "admin"``."""


class QueueFullError(HotModelError):
    """``[switch] max_queue`` requests already wait for a model (429, with Retry-After)."""

    def __init__(self, message: str, retry_after: float, limit: int = 0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # capacity hints, as llama-swap's fair-share scheduler sends them
        self.headers = {"x-ratelimit-limit": str(limit), "x-ratelimit-waiting": str(limit)}

    @classmethod
    def over(cls, limit: int, retry_after: float) -> QueueFullError:
        return cls(
            f"{limit} requests already wait for a model to be loaded ([switch] max_queue); "
            f"retry in about {retry_after:.0f} s",
            retry_after,
            limit,
        )


class SlotBusyError(HotModelError):
    """Another API key's request held the model's slot past the wait bound (503)."""


class ShuttingDownError(HotModelError):
    """hotmodel is stopping: no new switch or command is taken."""


class StoreError(HotModelError):
    """The session store cannot be opened or used."""


class StoreUnavailableError(StoreError):
    """The shared store (PostgreSQL) cannot be reached: nothing was read or written."""


class ClusterError(HotModelError):
    """The cluster's local PostgreSQL, or another node, cannot be used."""


class PeerUnreachableError(ClusterError):
    """A peer gave no answer's head: the request may be placed again."""


class PeerLostError(ClusterError):
    """A peer's answer broke off after it began."""


class SwitchError(HotModelError):
    """A model switch did not complete."""


class SwitchBusyError(SwitchError):
    """A request waited past its bound for a running switch."""


class SwitchCancelledError(SwitchError):
    """A generation was cancelled so that a switch could go on."""


class SwitchFailedError(SwitchError):
    """A switch failed; ``report`` says how far it got and what is active now."""

    def __init__(self, message: str, report: object = None, detail: str | None = None) -> None:
        super().__init__(message, detail=detail)
        self.report = report


class ProvisionError(HotModelError):
    """Setting up llama-server or the models failed."""


@dataclass(frozen=True, slots=True)
class HttpError:
    """How an error is shown to an HTTP client, in OpenAI's error shape."""

    status: int
    type: str
    code: str


# First match wins: subclasses before their bases.
_HTTP_ERRORS: tuple[tuple[type[HotModelError], HttpError], ...] = (
    (ModelNotFoundError, HttpError(404, "invalid_request_error", "model_not_found")),
    (SessionNotFoundError, HttpError(404, "invalid_request_error", "session_not_found")),
    (ResponseNotFoundError, HttpError(404, "invalid_request_error", "response_not_found")),
    (AutoSwitchForbiddenError, HttpError(403, "invalid_request_error", "auto_switch_forbidden")),
    (ModelResidentError, HttpError(400, "invalid_request_error", "model_resident")),
    (ModelNotActiveError, HttpError(409, "invalid_request_error", "model_not_active")),
    (SessionBusyError, HttpError(409, "invalid_request_error", "session_busy")),
    (SessionLimitError, HttpError(409, "invalid_request_error", "session_limit_reached")),
    (SessionFullError, HttpError(409, "invalid_request_error", "session_full")),
    (PayloadTooLargeError, HttpError(413, "invalid_request_error", "request_too_large")),
    (RequestTimeoutError, HttpError(408, "invalid_request_error", "request_timeout")),
    (ContextLengthError, HttpError(400, "invalid_request_error", "context_length_exceeded")),
    (UnsupportedEndpointError, HttpError(400, "invalid_request_error", "unsupported_endpoint")),
    (RequestError, HttpError(400, "invalid_request_error", "invalid_request")),
    (ConfigError, HttpError(400, "invalid_request_error", "invalid_config")),  # a reload's
    (SwitchBusyError, HttpError(503, "server_error", "switch_in_progress")),
    (SwitchCancelledError, HttpError(503, "server_error", "switch_cancelled")),
    (SwitchFailedError, HttpError(502, "server_error", "switch_failed")),
    (RouterTimeoutError, HttpError(504, "server_error", "upstream_timeout")),
    (ResidentUnavailableError, HttpError(503, "server_error", "resident_unavailable")),
    (ModelUnavailableError, HttpError(503, "server_error", "model_unavailable")),
    (RouterError, HttpError(503, "server_error", "router_unavailable")),
    (ShuttingDownError, HttpError(503, "server_error", "shutting_down")),
    (SlotBusyError, HttpError(503, "server_error", "slot_busy")),
    (QueueFullError, HttpError(429, "server_error", "queue_full")),
    (StoreUnavailableError, HttpError(503, "server_error", "store_unavailable")),
    (StoreError, HttpError(500, "server_error", "store_error")),
    (ClusterError, HttpError(503, "server_error", "cluster_unavailable")),
)
_INTERNAL = HttpError(500, "server_error", "internal_error")


def http_error_for(exc: HotModelError) -> HttpError:
    """The HTTP status and OpenAI ``type``/``code`` for one of our errors."""
    return next((http for cls, http in _HTTP_ERRORS if isinstance(exc, cls)), _INTERNAL)
