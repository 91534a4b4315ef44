"""Every HTTP call hotmodel makes to llama-server goes through :class:`RouterClient`.

Chat pass-through (plain and streamed), template + tokenize, prefill, model
load/unload/list, the ``/models/sse`` feed and ``/health``. Every call site
runs inside :func:`~hotmodel.router.boundary.boundary`, the one place where
httpx's and aiohttp's errors become :mod:`hotmodel.errors`, and the message
names what was being done and the setting that bounds it. The chat data path
alone goes over aiohttp (``chat_http.py``): it costs less than half of httpx's
CPU per request; it goes to the loaded model's own server when its port is
known, else to the router.

Load and unload are idempotent: loading a model that is already running, or
unloading one that is not, is success, so no caller has to read the state
first to decide whether to act.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import anyio
import httpx

from hotmodel.errors import (
    ModelUnavailableError,
    RouterError,
    RouterProtocolError,
    RouterRefusedError,
    detail_of,
)
from hotmodel.router.boundary import boundary, stale
from hotmodel.router.chat_http import CHAT, CHAT_PATH, ChatHttp, Upstream
from hotmodel.router.models import ModelStatus, error_message, parse_models
from hotmodel.sse import SseEvent, SseParser

log = logging.getLogger("hotmodel.router")

# Control calls (GET /models, load/unload commands, tokenizer) are answered
# from the router's memory or a short computation; this bounds them.
CONTROL_TIMEOUT_S = 10.0
CONTROL_SETTING = "hotmodel's fixed 10 s bound on router control calls"
# How long /health may take before the router counts as not answering.
HEALTH_TIMEOUT_S = 2.0

# llama-server's answers that mean "already so" for an idempotent command.
_ALREADY_RUNNING = "model is already running"
_NOT_RUNNING = "model is not running"


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
    except httpx.HTTPError as exc:
        if not stale(exc):
            raise  # the router may have read the request: sending it again could run it twice
        return await http.send(request, stream=stream)


class RouterClient:
    """Talks to one router at ``base_url`` through a shared ``httpx.AsyncClient``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        request_timeout: float = 600.0,
        direct: bool = False,
        chat_http: ChatHttp | None = None,
    ) -> None:
        self._http = http
        self._chat_http = chat_http  # the data path (aiohttp); control calls use ``http``
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        # Chat goes straight to a loaded model's own server when its port is known: the
        # router answers proxied requests with "Connection: close" (a new TCP connection
        # each time) and adds a hop; the model's server keeps connections alive.
        self.direct_enabled = direct
        self.direct: dict[str, str] = {}
        # Told when a model's own server refuses connections (the watchdog sets it).
        self.on_model_lost: Callable[[str], None] | None = None

    def set_direct(self, model: str, port: int | None) -> None:
        """``model`` is loaded and listens on ``port`` (None: unknown, use the router)."""
        if self.direct_enabled and port is not None:
            host = self.base_url.rsplit(":", 1)[0]
            self.direct[model] = f"{host}:{port}"
        else:
            self.direct.pop(model, None)

    def drop_direct(self, model: str) -> None:
        self.direct.pop(model, None)

    def _lost(self, model: str, exc: RouterRefusedError) -> ModelUnavailableError:
        """``model``'s own server refused a connection: forget its port, say so."""
        self.drop_direct(model)
        if self.on_model_lost is not None:
            try:
                self.on_model_lost(model)
            except Exception:  # the client's answer must not depend on it
                log.exception("reporting the loss of %r's process failed", model)
        return ModelUnavailableError(
            f"the process of model {model!r} is not running (it ended unexpectedly); "
            "it is being loaded again, retry shortly",
            detail=exc.detail,
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        timeout: float = CONTROL_TIMEOUT_S,
        setting: str = CONTROL_SETTING,
    ) -> httpx.Response:
        request = self._http.build_request(
            method, self.base_url + path, json=json_body, timeout=timeout
        )
        with boundary(f"{method} {path}", timeout, setting):
            return await send(self._http, request)

    async def _post_json(
        self,
        path: str,
        body: Mapping[str, Any],
        timeout: float = CONTROL_TIMEOUT_S,
        setting: str = CONTROL_SETTING,
    ) -> dict[str, Any]:
        resp = await self._request("POST", path, json_body=body, timeout=timeout, setting=setting)
        if resp.status_code != 200:
            raise RouterProtocolError(
                f"POST {path} answered {resp.status_code}: {error_message(resp.content)}"
            )
        try:
            data = resp.json()
        except ValueError as exc:
            raise RouterProtocolError(
                f"POST {path} answered invalid JSON", detail=detail_of(exc)
            ) from exc
        if not isinstance(data, dict):
            raise RouterProtocolError(f"POST {path} answered {str(data)[:200]}")
        return data

    # --- the router's own endpoints ---

    async def health(self) -> bool:
        """True when the router answers ``/health`` with 200."""
        try:
            resp = await self._request("GET", "/health", timeout=HEALTH_TIMEOUT_S)
        except RouterError:
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
            raise RouterProtocolError(
                "GET /models answered invalid JSON", detail=detail_of(exc)
            ) from exc

    async def load(self, model: str) -> bool:
        """Ask the router to load ``model``; False when it is already running (success)."""
        return await self._command("/models/load", model, _ALREADY_RUNNING)

    async def unload(self, model: str) -> bool:
        """Ask the router to unload ``model``; False when it is not running (success)."""
        return await self._command("/models/unload", model, _NOT_RUNNING)

    async def _command(self, path: str, model: str, already: str) -> bool:
        resp = await self._request("POST", path, json_body={"model": model})
        if resp.status_code == 200:
            return True
        message = error_message(resp.content)
        if resp.status_code == 400 and message == already:
            return False
        raise RouterError(f"POST {path} for {model!r} answered {resp.status_code}: {message}")

    @contextlib.asynccontextmanager
    async def model_events(self) -> AsyncIterator[AsyncIterator[SseEvent]]:
        """Open ``GET /models/sse``; yields its events as they come (closed on exit).

        The router registers the subscriber before it sends the headers, so
        no status change after this yields is missed.
        """
        request = self._http.build_request(
            "GET", self.base_url + "/models/sse", timeout=httpx.Timeout(5.0, read=None)
        )
        with boundary("GET /models/sse", 5.0, CONTROL_SETTING):
            resp = await send(self._http, request, stream=True)
        try:
            if resp.status_code != 200:
                raise RouterProtocolError(f"GET /models/sse answered {resp.status_code}")

            async def events() -> AsyncIterator[SseEvent]:
                parser = SseParser()
                with boundary("GET /models/sse", 5.0, CONTROL_SETTING):
                    async for chunk in resp.aiter_raw():
                        for event in parser.feed(chunk):
                            yield event

            yield events()
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()

    # --- requests routed to the loaded model's child ---

    @contextlib.asynccontextmanager
    async def chat(
        self,
        body: bytes,
        accept: str = "*/*",
        model: str | None = None,
        path: str = CHAT_PATH,
        what: str = CHAT,
    ) -> AsyncIterator[Upstream]:
        """Send a chat completion (or, with ``path``, any inference request of llama-server's:
        ``what`` is ``"POST path"``, what a failure names); yields the open answer, closed
        on exit on every path.

        To ``model``'s own server when its port is known, else through the
        router. A model's server whose port refuses connections is gone (its
        process crashed or was killed: an unload drops the port first): that is
        a :class:`ModelUnavailableError` (503), the port is forgotten and
        ``on_model_lost`` is told, so that the model is loaded again (the
        router, asked instead, would answer "proxy error" until it notices the
        exit). Closing an answer whose body was not read to the end closes its
        connection, which is how llama-server learns to stop generating.
        """
        if self._chat_http is None:
            raise RuntimeError("RouterClient.chat needs a ChatHttp")  # a bug: runtime gives one
        direct = self.direct.get(model) if model is not None else None
        if direct is None or model is None:
            upstream = await self._chat_http.post(self.base_url + path, body, accept, what)
        else:
            try:
                upstream = await self._chat_http.post(direct + path, body, accept, what)
            except RouterRefusedError as exc:
                raise self._lost(model, exc) from exc
        try:
            yield upstream
        finally:
            upstream.close()  # even when the request is cancelled (a sync call: nothing to await)

    async def count_tokens(self, model: str, messages: Sequence[Mapping[str, Any]]) -> int:
        """Exact prompt tokens of ``messages`` on ``model`` (its chat template and tokenizer)."""
        templated = await self._post_json(
            "/apply-template", {"model": model, "messages": list(messages)}
        )
        tokens = await self._post_json(
            "/tokenize",
            {
                "model": model,
                "content": templated.get("prompt", ""),
                "add_special": True,
                "parse_special": True,
            },
        )
        if not isinstance(tokens.get("tokens"), list):
            raise RouterProtocolError(f"unexpected /tokenize answer: {str(tokens)[:200]}")
        return len(tokens["tokens"])

    async def prefill(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        timeout: float,
        setting: str,
        cache: bool = True,
        slot: int | None = None,
    ) -> dict[str, Any]:
        """Evaluate ``messages`` on ``model`` (a 1-token answer) so its prompt cache holds them.

        ``cache``: reuse what the slot holds (false when another API key's prompt is there).
        Returns llama-server's ``timings`` (``prompt_n``, ``prompt_ms``, ...).
        """
        body = {
            "model": model,
            "messages": list(messages),
            "max_tokens": 1,
            "cache_prompt": cache,
            **({} if slot is None else {"id_slot": slot}),
            "temperature": 0,
        }
        answer = await self._post_json("/v1/chat/completions", body, timeout, setting)
        timings = answer.get("timings")
        return timings if isinstance(timings, dict) else {}

    async def slot(self, model: str, action: str, filename: str, timeout: float) -> dict[str, Any]:
        """Save or restore slot 0 of ``model`` to/from ``filename`` in ``--slot-save-path``.

        The answer carries ``n_saved``/``n_restored`` (tokens) and
        ``n_written``/``n_read`` (bytes).
        """
        return await self._post_json(
            f"/slots/0?action={action}",
            {"model": model, "filename": filename},
            timeout,
            "[switch] load_timeout_seconds",
        )
