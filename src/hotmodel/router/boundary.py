"""The one error boundary to llama-server, whichever HTTP library made the call.

hotmodel speaks HTTP to llama-server with two libraries: httpx for the control
calls (``client.py``) and aiohttp for the chat data path (``chat_http.py``).
Their exceptions never leave ``router/``: every call runs inside
:func:`boundary`, which sorts a library's error into one :class:`Failure` kind
and raises the one hotmodel error that kind maps to, with its one public
wording (:data:`WORDING`), as httpx itself maps httpcore's errors in one place.
The library's own text (the address, the OS error) becomes the error's
private ``detail``, for the server log only.

The same place knows which failures mean that llama-server never read the
request: a refused connection (:class:`~hotmodel.errors.RouterRefusedError`:
the caller may wait for a recovery and send it again) and a stale kept-alive
connection (:func:`stale`: sent again at once on a fresh one).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import aiohttp
import httpx

from hotmodel.errors import (
    RouterError,
    RouterRefusedError,
    RouterTimeoutError,
    RouterUnavailableError,
    detail_of,
)


class Failure(enum.Enum):
    """What went wrong on the way to llama-server, whatever the library said."""

    REFUSED = "refused"  # no connection could be made (refused, unreachable): nothing sent
    CONNECT_TIMEOUT = "connect_timeout"  # the connection was not accepted in time
    TIMEOUT = "timeout"  # connected, but no answer within the bound
    DISCONNECTED = "disconnected"  # the connection closed, or the answer broke HTTP
    TRANSPORT = "transport"  # any other transport failure


# The one table: each kind's hotmodel error and its public wording. ``{timeout}`` and
# ``{setting}`` name the bound, so a slow answer is never told as "could not be reached".
WORDING: dict[Failure, tuple[type[RouterError], str]] = {
    Failure.REFUSED: (RouterRefusedError, "llama-server could not be reached"),
    Failure.CONNECT_TIMEOUT: (RouterUnavailableError, "llama-server did not accept a connection"),
    Failure.TIMEOUT: (
        RouterTimeoutError,
        "llama-server did not answer within {timeout:g}s ({setting})",
    ),
    Failure.DISCONNECTED: (RouterUnavailableError, "the connection to llama-server broke"),
    Failure.TRANSPORT: (RouterUnavailableError, "the request to llama-server failed"),
}

# What the boundary catches: every error either library raises for a failed call
# (aiohttp's timeouts are TimeoutErrors; some of its paths raise a bare one).
FOREIGN = (httpx.HTTPError, aiohttp.ClientError, TimeoutError)


_DISCONNECTED = (
    # httpx: the socket failed after connecting, or the answer was not HTTP
    httpx.ReadError,
    httpx.WriteError,
    httpx.CloseError,
    httpx.ProtocolError,
    # aiohttp: the same (ClientOSError's connect failures are sorted out before)
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientConnectionResetError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientResponseError,
)


def failure_of(exc: BaseException) -> Failure | None:
    """The kind of ``exc`` (None: not a failed call of either library). The order
    matters: a connect timeout is a timeout, and aiohttp's is a ClientError too."""
    if isinstance(exc, httpx.ConnectTimeout | aiohttp.ConnectionTimeoutError):
        return Failure.CONNECT_TIMEOUT
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return Failure.TIMEOUT
    if isinstance(exc, httpx.ConnectError | aiohttp.ClientConnectorError):
        return Failure.REFUSED
    if isinstance(exc, _DISCONNECTED):
        return Failure.DISCONNECTED
    if isinstance(exc, httpx.HTTPError | aiohttp.ClientError):
        return Failure.TRANSPORT
    return None


def error_for(
    failure: Failure, what: str, timeout: float, setting: str, detail: str | None = None
) -> RouterError:
    """hotmodel's error for ``failure`` of the call ``what`` (its public message)."""
    cls, wording = WORDING[failure]
    return cls(f"{what}: {wording.format(timeout=timeout, setting=setting)}", detail=detail)


def foreign_detail(exc: BaseException) -> str:
    """The library's error for the log: its type and text, and the URL when httpx's
    text lacks it (aiohttp's connect errors name the address themselves)."""
    text = detail_of(exc)
    if isinstance(exc, httpx.HTTPError):
        try:
            return f"{text} ({exc.request.method} {exc.request.url})"
        except RuntimeError:  # no request attached
            return text
    return text


@contextlib.contextmanager
def boundary(what: str, timeout: float, setting: str) -> Iterator[None]:
    """Turn either library's errors raised inside into hotmodel's (the one place).

    ``what`` names the call ("POST /v1/chat/completions"); ``timeout`` and
    ``setting`` the bound and where it is configured.
    """
    try:
        yield
    except FOREIGN as exc:
        failure = failure_of(exc) or Failure.TRANSPORT
        raise error_for(failure, what, timeout, setting, foreign_detail(exc)) from exc


def stale(exc: BaseException) -> bool:
    """Whether ``exc`` is a request that met a kept-alive connection closed without
    notice, before llama-server read it: safe to send once more on a fresh one.

    httpx says so in words ("Server disconnected without sending a response");
    aiohttp as a disconnect, or a socket error while writing, on a connection that
    was made (a failed connect is no stale connection: retrying it would fail the
    same way).
    """
    if isinstance(exc, httpx.RemoteProtocolError):
        return "without sending a response" in str(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False
    return isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
