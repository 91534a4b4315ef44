"""The chat data path's HTTP client: aiohttp, for the one call that runs per request.

Every chat request is one POST to llama-server (the loaded model's own
server, or the router). Measured on the 2-core test machine, httpx spent
~1.3 ms of CPU per such request and aiohttp ~0.56 ms (docs/performance.md),
which is most of what a proxy adds; so the data path uses aiohttp, while
control calls (load, unload, /models, tokenize, slots) stay on httpx in
``client.py``, where a millisecond does not matter and MockTransport keeps
their tests simple.

:func:`mapped_aiohttp` is this client's one error boundary (the twin of
``client.mapped``): aiohttp's exceptions become hotmodel's, and a timeout
names the setting that bounds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType

import aiohttp

from hotmodel.errors import RouterTimeoutError, RouterUnavailableError, detail_of

CONNECT_TIMEOUT_S = 5.0


@contextlib.contextmanager
def mapped_aiohttp(what: str, timeout: float, setting: str) -> Iterator[None]:
    """Translate aiohttp's errors raised inside into hotmodel's hierarchy.

    The message says what failed in words a client can read; aiohttp's own text
    (the address, the OS error) is the error's ``detail``, for the server log.
    """
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise RouterUnavailableError(
            f"{what}: llama-server did not accept a connection", detail=detail_of(exc)
        ) from exc
    except TimeoutError as exc:  # aiohttp's socket read timeout is a TimeoutError
        raise RouterTimeoutError(
            f"{what}: llama-server did not answer within {timeout:g}s ({setting})",
            detail=detail_of(exc),
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise RouterUnavailableError(
            f"{what}: llama-server could not be reached", detail=detail_of(exc)
        ) from exc
    except aiohttp.ClientError as exc:
        raise RouterUnavailableError(
            f"{what}: the connection to llama-server broke", detail=detail_of(exc)
        ) from exc


class Upstream:
    """An open answer of llama-server; its body is read through mapped errors."""

    def __init__(self, response: aiohttp.ClientResponse, what: str, timeout: float, setting: str):
        self.status_code = response.status
        self._response = response
        self._what, self._timeout, self._setting = what, timeout, setting

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, chunk by chunk (never buffered)."""
        with mapped_aiohttp(self._what, self._timeout, self._setting):
            async for chunk in self._response.content.iter_any():
                yield chunk

    def arrived(self) -> bool:
        """Whether the whole body is already here (reading it cannot wait on llama-server)."""
        return self._response.content.is_eof()

    async def read(self) -> bytes:
        with mapped_aiohttp(self._what, self._timeout, self._setting):
            return await self._response.read()

    def close(self) -> None:
        """Return a fully read connection to the pool; close one whose body was not read
        to the end (that is how llama-server learns to stop generating)."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class ChatHttp:
    """One pooled aiohttp session (kept-alive connections) for the chat data path."""

    def __init__(self, request_timeout: float, headers: Mapping[str, str] | None = None) -> None:
        self.request_timeout = request_timeout
        self._headers = dict(headers or {})  # llama-server's key (Authorization)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ChatHttp:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            # per read, like httpx's: a generation may stream for minutes
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=self.request_timeout
            ),
            auto_decompress=False,  # bytes are relayed as llama-server sent them
            trust_env=False,
            skip_auto_headers=("User-Agent",),
            headers=self._headers,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, body: bytes, accept: str) -> aiohttp.ClientResponse:
        """POST ``body``; retried once when a kept-alive connection turns out closed.

        llama-server closes idle kept-alive connections without notice, and a
        model's server that exited leaves its pooled connections dead: a
        request on such a connection fails before any answer arrives (the
        server disconnected, or the body could not be written), so llama-server
        never ran it, and it is sent again on a fresh connection (which, to a
        server that is gone, fails to connect: the caller's cue to ask the
        router instead).
        """
        if self._session is None:
            raise RuntimeError("ChatHttp is used outside its 'async with'")  # a bug
        headers = {"content-type": "application/json", "accept": accept}
        try:
            return await self._session.post(url, data=body, headers=headers)
        except aiohttp.ClientConnectorError:
            raise  # no connection was made: nothing to retry on another one
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return await self._session.post(url, data=body, headers=headers)
