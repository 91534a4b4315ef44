"""The data path's HTTP client: aiohttp, for the one call that runs per request.

Every chat request (and every other inference request: completions, infill,
embeddings, rerank, the tokenizer endpoints) is one POST to llama-server (the loaded model's own
server, or the router). Measured on the 2-core test machine, httpx spent
~1.3 ms of CPU per such request and aiohttp ~0.56 ms (docs/performance.md),
which is most of what a proxy adds; so the data path uses aiohttp, while
control calls (load, unload, /models, tokenize, slots) stay on httpx in
``client.py``, where a millisecond does not matter and MockTransport keeps
their tests simple.

:class:`ChatHttp` and :class:`Upstream` touch aiohttp only inside
:func:`~hotmodel.router.boundary.boundary`, the same one the control calls use:
aiohttp's exceptions become hotmodel's, with the same wording as httpx's, and a
timeout names the setting that bounds it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from types import TracebackType

import aiohttp

from hotmodel.router.boundary import boundary, stale

CONNECT_TIMEOUT_S = 5.0
CHAT_PATH = "/v1/chat/completions"
CHAT = f"POST {CHAT_PATH}"
REQUEST_SETTING = "[server] request_timeout_seconds"


class Upstream:
    """An open answer of llama-server; its body is read inside the boundary."""

    def __init__(self, response: aiohttp.ClientResponse, timeout: float, what: str = CHAT) -> None:
        self.status_code = response.status
        self._response = response
        self._timeout = timeout
        self._what = what  # "POST /path": what a failure names

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, chunk by chunk (never buffered)."""
        with boundary(self._what, self._timeout, REQUEST_SETTING):
            async for chunk in self._response.content.iter_any():
                yield chunk

    def arrived(self) -> bool:
        """Whether the whole body is already here (reading it cannot wait on llama-server)."""
        return self._response.content.is_eof()

    async def read(self) -> bytes:
        with boundary(self._what, self._timeout, REQUEST_SETTING):
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

    async def post(self, url: str, body: bytes, accept: str, what: str = CHAT) -> Upstream:
        """POST ``body`` (a chat completion, or any inference request: ``what`` names it,
        ``"POST /path"``); the open answer. Retried once when a kept-alive connection turns
        out closed.

        llama-server closes idle kept-alive connections without notice, and a
        model's server that exited leaves its pooled connections dead: a
        request on such a connection fails before any answer arrives (the
        server disconnected, or the body could not be written), so llama-server
        never ran it, and it is sent again on a fresh connection (which, to a
        server that is gone, fails to connect: a
        :class:`~hotmodel.errors.RouterRefusedError`, the caller's cue to ask the
        router instead).
        """
        if self._session is None:
            raise RuntimeError("ChatHttp is used outside its 'async with'")  # a bug
        headers = {"content-type": "application/json", "accept": accept}
        with boundary(what, self.request_timeout, REQUEST_SETTING):
            try:
                response = await self._session.post(url, data=body, headers=headers)
            except aiohttp.ClientError as exc:
                if not stale(exc):
                    raise
                response = await self._session.post(url, data=body, headers=headers)
        return Upstream(response, self.request_timeout, what)
