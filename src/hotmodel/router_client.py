"""A typed client for the llama-server router's own endpoints.

``/health``, ``GET /models``, ``POST /models/load`` and ``/models/unload``.
The router answers load/unload requests at once and does the work afterwards,
so completion is observed on ``GET /models`` (see :meth:`RouterClient.wait_loaded`).
httpx errors are translated to :mod:`hotmodel.errors` here, in :meth:`_request`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from hotmodel.errors import (
    HotModelError,
    ModelLoadError,
    RouterError,
    RouterProtocolError,
    RouterUnavailableError,
)

# GET /models is answered from the router's memory; polling it this often is cheap
# and keeps the time between "loaded" and our noticing it small.
_POLL_FIRST_S = 0.01
_POLL_MAX_S = 0.1
# With a /models/sse subscription, each event triggers a GET /models at once;
# this slower poll only guards against a lost event.
_POLL_WITH_EVENTS_S = 0.25


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One entry of the router's ``GET /models``."""

    id: str
    value: str  # unloaded | loading | loaded | sleeping
    failed: bool = False
    exit_code: int | None = None
    port: int | None = None


def parse_models(payload: Any) -> dict[str, ModelStatus]:
    """Parse a ``GET /models`` answer into statuses by model id."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise RouterProtocolError(f"unexpected GET /models answer: {str(payload)[:200]}")
    out: dict[str, ModelStatus] = {}
    for item in payload["data"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        raw_status = item.get("status")
        status: dict[str, Any] = raw_status if isinstance(raw_status, dict) else {}
        raw_args = status.get("args")
        args: list[Any] = raw_args if isinstance(raw_args, list) else []
        exit_code = status.get("exit_code")
        out[item["id"]] = ModelStatus(
            id=item["id"],
            value=str(status.get("value", "unknown")),
            failed=bool(status.get("failed", False)),
            exit_code=exit_code if isinstance(exit_code, int) else None,
            port=_port_from_args(args),
        )
    return out


def _port_from_args(args: list[Any]) -> int | None:
    for flag, value in itertools.pairwise(args):
        if flag == "--port" and str(value).isdigit():
            return int(value)
    return None


async def send(
    http: httpx.AsyncClient, request: httpx.Request, stream: bool = False
) -> httpx.Response:
    """Send ``request``, retrying once when a kept-alive connection turns out closed.

    llama-server's router closes some kept-alive connections right after a
    response without saying ``Connection: close``; a request that races that
    close fails with "Server disconnected without sending a response" before
    the router read it, so sending it again on a fresh connection is safe.
    """
    try:
        return await http.send(request, stream=stream)
    except httpx.RemoteProtocolError:
        return await http.send(request, stream=stream)


def error_message(body: bytes) -> str:
    """The message of an error answer, whether llama-server's JSON shape or plain text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace").strip()[:500] or "(empty answer)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return json.dumps(data)[:500]


class RouterClient:
    """Talks to one router at ``base_url`` through a shared ``httpx.AsyncClient``."""

    def __init__(self, http: httpx.AsyncClient, base_url: str) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> httpx.Response:
        request = self._http.build_request(
            method, self.base_url + path, json=json_body, timeout=timeout
        )
        try:
            return await send(self._http, request)
        except httpx.TimeoutException as exc:
            raise RouterUnavailableError(f"router timed out on {method} {path}") from exc
        except httpx.HTTPError as exc:
            raise RouterUnavailableError(f"router unreachable on {method} {path}: {exc!r}") from exc

    async def post_json(self, path: str, body: Mapping[str, Any], timeout: float = 60.0) -> Any:
        """POST ``body`` to the router; the decoded answer, or a RouterError naming it."""
        resp = await self._request("POST", path, json_body=body, timeout=timeout)
        if resp.status_code != 200:
            raise RouterProtocolError(
                f"POST {path} answered {resp.status_code}: {error_message(resp.content)}"
            )
        try:
            return resp.json()
        except ValueError as exc:
            raise RouterProtocolError(f"POST {path} answered invalid JSON: {exc}") from exc

    async def health(self) -> bool:
        """True when the router answers ``/health`` with 200."""
        try:
            resp = await self._request("GET", "/health", timeout=2.0)
        except RouterUnavailableError:
            return False
        return resp.status_code == 200

    async def models(self) -> dict[str, ModelStatus]:
        resp = await self._request("GET", "/models")
        if resp.status_code != 200:
            raise RouterProtocolError(
                f"GET /models answered {resp.status_code}: {error_message(resp.content)}"
            )
        try:
            return parse_models(resp.json())
        except ValueError as exc:
            raise RouterProtocolError(f"GET /models answered invalid JSON: {exc}") from exc

    async def load(self, model: str) -> None:
        """Ask the router to load ``model``; completion is observed by :meth:`wait_loaded`."""
        await self._command("/models/load", model)

    async def unload(self, model: str) -> None:
        await self._command("/models/unload", model)

    async def _command(self, path: str, model: str) -> None:
        resp = await self._request("POST", path, json_body={"model": model})
        if resp.status_code != 200:
            raise RouterError(
                f"POST {path} for {model!r} answered {resp.status_code}: "
                f"{error_message(resp.content)}"
            )

    async def wait_loaded(
        self,
        model: str,
        timeout: float,
        log_tail: Callable[[], str] = lambda: "",
        changed: asyncio.Event | None = None,
    ) -> ModelStatus:
        """Wait until ``model`` reads ``loaded``; a failed load or the deadline raises.

        ``success: true`` from ``/models/load`` proves nothing: a bad GGUF is
        accepted and then ends ``unloaded`` with ``failed: true``.
        """
        seen_loading = False

        def done(status: ModelStatus) -> bool:
            nonlocal seen_loading
            if status.value == "loading":
                seen_loading = True
            elif status.value == "unloaded" and (seen_loading or status.failed):
                # A stale `failed` flag from an earlier attempt reads the same, but the
                # router flips the status to `loading` before it answers the load request.
                code = f" (exit code {status.exit_code})" if status.exit_code is not None else ""
                raise ModelLoadError(f"model {model!r} failed to load{code}", log_tail())
            return status.value == "loaded"

        def timed_out(status: ModelStatus) -> HotModelError:
            return ModelLoadError(
                f"model {model!r} did not reach 'loaded' within {timeout:g}s "
                f"(status {status.value!r})",
                log_tail(),
            )

        return await self._watch(model, timeout, done, timed_out, changed)

    async def wait_unloaded(
        self, model: str, timeout: float, changed: asyncio.Event | None = None
    ) -> ModelStatus:
        """Wait until ``model`` reads ``unloaded``.

        A ``failed`` flag is ignored here: the router sets it when a child it
        was asked to stop exits non-zero, which an unload is allowed to cause.
        """

        def timed_out(status: ModelStatus) -> HotModelError:
            return RouterError(
                f"model {model!r} did not reach 'unloaded' within "
                f"{timeout:g}s (status {status.value!r})"
            )

        return await self._watch(
            model, timeout, lambda s: s.value == "unloaded", timed_out, changed
        )

    async def load_and_wait(
        self, model: str, timeout: float, log_tail: Callable[[], str] = lambda: ""
    ) -> ModelStatus:
        """Load ``model`` and wait until it is ``loaded`` (see :meth:`wait_loaded`)."""
        async with self.events() as changed:
            await self.load(model)
            return await self.wait_loaded(model, timeout, log_tail, changed)

    async def unload_and_wait(self, model: str, timeout: float) -> ModelStatus:
        """Unload ``model`` and wait until it is ``unloaded``."""
        async with self.events() as changed:
            await self.unload(model)
            return await self.wait_unloaded(model, timeout, changed)

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[asyncio.Event | None]:
        """Subscribe to ``GET /models/sse``: yields an event set on every router event.

        The router registers the subscriber before it sends the response
        headers, so once this yields, no later status change is missed. Yields
        None when the stream cannot be opened (waits then fall back to polling).
        """
        changed = asyncio.Event()
        request = self._http.build_request(
            "GET", self.base_url + "/models/sse", timeout=httpx.Timeout(5.0, read=None)
        )
        try:
            resp = await send(self._http, request, stream=True)
        except httpx.HTTPError:
            yield None
            return
        if resp.status_code != 200:
            await resp.aclose()
            yield None
            return

        async def pump() -> None:
            with contextlib.suppress(httpx.HTTPError):
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        changed.set()

        task = asyncio.create_task(pump())
        try:
            yield changed
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.shield(resp.aclose())

    async def _watch(
        self,
        model: str,
        timeout: float,
        done: Callable[[ModelStatus], bool],
        timed_out: Callable[[ModelStatus], HotModelError],
        changed: asyncio.Event | None,
    ) -> ModelStatus:
        """Read ``GET /models`` until ``done(status)``, or raise ``timed_out`` at the deadline.

        With ``changed`` (a /models/sse subscription) it reads again as soon as
        the router reports an event; without, it polls with a backoff.
        """
        deadline = time.monotonic() + timeout
        delay = _POLL_FIRST_S
        while True:
            if changed is not None:
                changed.clear()  # before the read: an event after it wakes the wait below
            status = (await self.models()).get(model)
            if status is None:
                raise ModelLoadError(f"model {model!r} is not known to the router")
            if done(status):
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timed_out(status)
            if changed is None:
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, _POLL_MAX_S)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(_POLL_WITH_EVENTS_S, remaining))
