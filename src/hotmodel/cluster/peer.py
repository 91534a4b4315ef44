"""The boundary to other nodes: a request sent to a peer, its answer read as it comes.

Like ``router/boundary.py`` for llama-server, this is the one place httpx's
errors from a peer are caught: one that leaves no answer's head is a
:class:`~hotmodel.errors.PeerUnreachableError` (the request may be placed
again), one in the middle of the body a :class:`~hotmodel.errors.PeerLostError`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx

from hotmodel.errors import PeerLostError, PeerUnreachableError, detail_of

CONNECT_S = 5.0  # a peer that does not accept the connection in this long is skipped
PeerClient = httpx.AsyncClient


def peer_client() -> PeerClient:
    """The client a node forwards with. No read deadline: a forwarded generation streams
    as long as it streams (the peer's own request timeout bounds it)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=CONNECT_S),
        limits=httpx.Limits(max_keepalive_connections=32),
        trust_env=False,  # a peer on the LAN is not reached through a proxy
    )


class PeerAnswer:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers: list[tuple[bytes, bytes]] = list(response.headers.raw)
        self.streamed = response.headers.get("content-type", "").startswith("text/event-stream")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, undecoded."""
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise PeerLostError(
                "the node serving this request went away", detail=detail_of(exc)
            ) from exc


@contextlib.asynccontextmanager
async def send_to_peer(
    http: PeerClient, url: str, headers: Sequence[tuple[str, str]], body: bytes
) -> AsyncIterator[PeerAnswer]:
    """POST ``body`` to ``url``; the answer is open for the block and closed on every path."""
    request = http.build_request("POST", url, headers=list(headers), content=body)
    try:
        response = await http.send(request, stream=True)
    except httpx.HTTPError as exc:  # nothing of an answer came: safe to place again
        raise PeerUnreachableError(f"no answer from {url}", detail=detail_of(exc)) from exc
    try:
        yield PeerAnswer(response)
    finally:
        await response.aclose()


async def download(
    http: PeerClient,
    url: str,
    headers: Sequence[tuple[str, str]],
    into: Path,
    size: int,
    sha256: str,
) -> None:
    """GET ``url`` into the file ``into``, which exists only if it arrived whole with this
    ``size`` and ``sha256`` (written beside it first, then renamed)."""
    partial = into.with_name(into.name + ".partial")
    digest = hashlib.sha256()
    try:
        async with http.stream("GET", url, headers=list(headers)) as response:
            if response.status_code != 200:
                raise PeerUnreachableError(f"{url} answered {response.status_code}")
            with partial.open("wb") as out:
                async for chunk in response.aiter_bytes():
                    digest.update(chunk)
                    out.write(chunk)
        if partial.stat().st_size != size or digest.hexdigest() != sha256:
            raise PeerLostError(f"{url} sent a file that is not the one indexed (size or sha256)")
        partial.replace(into)
    except httpx.HTTPError as exc:
        raise PeerUnreachableError(f"no file from {url}", detail=detail_of(exc)) from exc
    finally:
        partial.unlink(missing_ok=True)
