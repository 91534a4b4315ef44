"""The inference endpoints besides chat (api/endpoints.py, api/inference.py), fast.

The checks are pure; the handler is driven as a plain ASGI app against a scripted
upstream on a real socket behind the real ``RouterClient`` (as tests/test_chat_relay.py
drives chat), with the real gate, tenants and control loop: each test checks what was
sent where, what the client got, and that the ticket was returned.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from hotmodel.api import endpoints as ep
from hotmodel.api.auth import RequireKeys
from hotmodel.api.inference import Inference
from hotmodel.config import Config
from hotmodel.errors import HotModelError, InvalidRequestError, ModelNotFoundError
from hotmodel.presets import Preset
from hotmodel.runtime import Services
from hotmodel.security import KeySet
from tests import fakes
from tests.fakes import door_config

# --- the checks (pure) ---


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    folder = tmp_path_factory.mktemp("cfg")
    return _config(folder)


# beside the chat preset m: an embedding model and a reranker
EMBEDDERS = (
    "\n[embed]\nmodel = m.gguf\nembeddings = true\npooling = mean\n\n"
    "[ranker]\nmodel = m.gguf\nembeddings = on\npooling = rank\n"
)


def _config(folder: Path) -> Config:
    return door_config(folder, EMBEDDERS, ctx_size=128)


def _refused(check: ep.Check, payload: dict[str, Any], config: Config) -> str | None:
    try:
        check(payload, config)
    except InvalidRequestError as exc:
        return exc.param
    return None


@pytest.mark.parametrize(
    ("check", "payload", "param"),
    [
        (ep.check_completion, {"prompt": "hi"}, None),
        (ep.check_completion, {"prompt": [1, 2, "x"]}, None),
        (ep.check_completion, {"prompt": [[1, 2], "x"]}, None),
        (ep.check_completion, {}, "prompt"),
        (ep.check_completion, {"prompt": 5}, "prompt"),
        (ep.check_completion, {"prompt": []}, "prompt"),
        (ep.check_completion, {"prompt": [-1]}, "prompt[0]"),
        (ep.check_completion, {"prompt": [[1, 2**40]]}, "prompt[0][1]"),
        (ep.check_completion, {"prompt": [None]}, "prompt[0]"),
        (ep.check_completion, {"prompt": "x", "n_predict": "5"}, "n_predict"),
        (ep.check_completion, {"prompt": "x", "cache_prompt": 1}, "cache_prompt"),
        (ep.check_completion, {"prompt": "x" * (128 * 64 + 1)}, "prompt"),  # no context fits
        (ep.check_infill, {"input_prefix": "a", "input_suffix": "b"}, None),
        (ep.check_infill, {"input_prefix": "a"}, "input_suffix"),
        (ep.check_infill, {"input_prefix": 1, "input_suffix": "b"}, "input_prefix"),
        (
            ep.check_infill,
            {"input_prefix": "a", "input_suffix": "b", "input_extra": [{"text": 1}]},
            "input_extra[0]",
        ),
        (
            ep.check_infill,
            {
                "input_prefix": "",
                "input_suffix": "",
                "input_extra": [{"filename": "f", "text": ""}],
            },
            None,
        ),
        (ep.check_tokenize, {"content": "hi", "with_pieces": True}, None),
        (ep.check_tokenize, {}, "content"),
        (ep.check_tokenize, {"content": "x", "add_special": "yes"}, "add_special"),
        (ep.check_detokenize, {"tokens": [1, 2]}, None),
        (ep.check_detokenize, {"tokens": "x"}, "tokens"),
        (ep.check_detokenize, {"tokens": [1, True]}, "tokens[1]"),
        (ep.check_template, {"messages": [{"role": "user", "content": "hi"}]}, None),
        (ep.check_template, {}, "messages"),
        (ep.check_template, {"messages": [{"role": "x", "content": "hi"}]}, "messages[0].role"),
        (ep.check_embeddings, {"input": ["a", "b"]}, None),
        (ep.check_embeddings, {"content": "a"}, None),  # llama.cpp's own field
        (ep.check_embeddings, {}, "input"),
        (ep.check_embeddings, {"input": "a", "encoding_format": "int8"}, "encoding_format"),
        (ep.check_rerank, {"query": "q", "documents": ["a"], "top_n": 1}, None),
        (ep.check_rerank, {"documents": ["a"]}, "query"),
        (ep.check_rerank, {"query": "q", "documents": []}, "documents"),
        (ep.check_rerank, {"query": "q", "documents": ["a", 2]}, "documents[1]"),
        (ep.check_rerank, {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ],
)
def test_each_check_names_the_field(
    check: ep.Check, payload: dict[str, Any], param: str | None, config: Config
) -> None:
    assert _refused(check, payload, config) == param


def test_which_preset_serves_what(config: Config) -> None:
    models = config.presets.models
    assert ep.served_by(models["m"], config) == [
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/completions",
        "/completion",
        "/completions",
        "/infill",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/responses/input_tokens",
    ]
    assert ep.served_by(models["embed"], config) == [
        "/tokenize",
        "/detokenize",
        "/v1/embeddings",
        "/embeddings",
        "/embedding",
    ]
    ranker = ep.served_by(models["ranker"], config)
    assert {"/v1/rerank", "/rerank", "/v1/reranking", "/reranking", "/v1/embeddings"} <= set(ranker)
    flag = Preset("r", {"rerank": "true"}, None)
    assert ep.Family.RERANK in ep.families(flag, config)
    off = Preset("e", {"embeddings": "false"}, None)
    assert ep.Family.EMBEDDING not in ep.families(off, config)


def test_an_embedding_request_for_a_chat_preset_is_refused_before_any_switch(
    config: Config,
) -> None:
    embeddings = next(e for e in ep.ENDPOINTS if e.path == "/v1/embeddings")
    rerank = next(e for e in ep.ENDPOINTS if e.path == "/v1/rerank")
    with pytest.raises(HotModelError, match="does not serve /v1/embeddings") as info:
        ep.check_serves(embeddings, "m", config)
    assert getattr(info.value, "param", None) == "model"
    ep.check_serves(embeddings, "embed", config)
    ep.check_serves(embeddings, "active", config)  # resolved later, then checked again
    ep.check_serves(embeddings, "nope", config)  # a 404 later
    with pytest.raises(HotModelError, match="pooling = rank"):
        ep.check_serves(rerank, "embed", config)
    ep.check_serves(rerank, "ranker", config)


def test_the_native_routes_need_a_client_key() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    keys = KeySet(client=("c",), admin=("a",))
    door = RequireKeys(app, keys=lambda: keys)

    async def status(path: str, key: str | None) -> int:
        sent: list[MutableMapping[str, Any]] = []
        headers = [] if key is None else [(b"authorization", f"Bearer {key}".encode())]
        scope = {"type": "http", "method": "POST", "path": path, "headers": headers}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await door(scope, _never, send)
        return int(sent[0]["status"])

    async def main() -> None:
        for endpoint in ep.ENDPOINTS:
            assert await status(endpoint.path, None) == 401, endpoint.path
            assert await status(endpoint.path, "c") == 204, endpoint.path

    asyncio.run(main())


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError


# --- the handler, against a scripted upstream ---


class Script(fakes.Script):
    """llama-server's answer: ``answer`` with ``status``, or a stream that never ends."""

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.answer: bytes = b'{"ok":true}'
        self.stream_forever = False
        self.closed = asyncio.Event()

    async def respond(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        try:
            if not self.stream_forever:
                return web.Response(
                    status=self.status, body=self.answer, content_type="application/json"
                )
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            while True:
                await resp.write(b'data: {"content":"x","stop":false}\n\n')
                await asyncio.sleep(0.01)
        finally:
            self.closed.set()


class Client(fakes.AsgiClient):
    """A request to one of the inference endpoints; ``leave`` makes its client leave,
    ``chunk`` is set by the first chunk of body sent."""

    def __init__(self, path: str, body: dict[str, Any], owner: str = "") -> None:
        super().__init__(path, body, owner)
        self.chunk = asyncio.Event()
        self.leave = asyncio.Event()

    async def left(self) -> None:
        await self.leave.wait()

    async def send(self, message: MutableMapping[str, Any]) -> None:
        await super().send(message)
        if message.get("body"):
            self.chunk.set()

    async def call(self, s: Services) -> None:
        endpoint = next(e for e in ep.ENDPOINTS if e.path == self.path)
        await Inference(s, endpoint)(self.scope, self.receive, self.send)


@pytest.mark.parametrize("endpoint", [e for e in ep.ENDPOINTS if e.family is not ep.Family.RERANK])
def test_each_endpoint_goes_to_its_own_path_with_the_model_named(
    tmp_path: Path, endpoint: ep.Endpoint
) -> None:
    bodies: dict[ep.Family, dict[str, Any]] = {
        ep.Family.COMPLETION: {"prompt": "hi", "input_prefix": "a", "input_suffix": "b"},
        ep.Family.TOKENIZER: {"content": "hi", "tokens": [1]},
        ep.Family.TEMPLATE: {"messages": [{"role": "user", "content": "hi"}]},
        ep.Family.EMBEDDING: {"input": "hi", "model": "embed"},
    }

    async def scenario(s: Services, script: Script) -> None:
        if endpoint.family is ep.Family.EMBEDDING:
            s.controller.engine.active = "embed"  # (a resident's admission: the real tests)
        client = Client(endpoint.path, bodies[endpoint.family])
        await client.call(s)
        assert client.status == 200 and client.text() == '{"ok":true}'
        ((path, sent),) = script.got
        assert path == endpoint.path
        assert sent["model"] == ("embed" if endpoint.family is ep.Family.EMBEDDING else "m")
        # a generation gets a bound when it sets none ([server] default_max_tokens)
        assert ("max_tokens" in sent) == endpoint.generates

    fakes.run_scripted(Script(), scenario, _config(tmp_path))


def test_a_stream_is_relayed_and_a_client_that_leaves_stops_it(tmp_path: Path) -> None:
    async def scenario(s: Services, script: Script) -> None:
        script.stream_forever = True
        client = Client("/completion", {"prompt": "hi", "stream": True})
        task = asyncio.create_task(client.call(s))
        await client.chunk.wait()
        assert client.status == 200 and len(s.gate.inflight()) == 1
        assert '"content":"x"' in client.text()
        client.leave.set()
        await asyncio.wait_for(task, 5)
        await asyncio.wait_for(script.closed.wait(), 5)  # llama-server was told to stop

    fakes.run_scripted(Script(), scenario, _config(tmp_path))


def test_a_model_that_cannot_serve_it_is_a_400_and_an_unknown_one_a_404(tmp_path: Path) -> None:
    async def scenario(s: Services, script: Script) -> None:
        with pytest.raises(HotModelError, match="does not serve"):
            await Client("/v1/embeddings", {"input": "hi"}).call(s)  # the active chat model
        with pytest.raises(ModelNotFoundError):
            await Client("/v1/embeddings", {"input": "hi", "model": "nope"}).call(s)
        with pytest.raises(ModelNotFoundError):
            await Client("/tokenize", {"content": "hi", "model": "nope"}).call(s)
        assert script.got == []
        script.status, script.answer = 501, b'{"error":{"code":501,"message":"no FIM"}}'
        client = Client("/infill", {"input_prefix": "a", "input_suffix": "b"})
        await client.call(s)  # llama-server's "not supported": the client's 400
        assert client.status == 400
        error = json.loads(client.text())["error"]
        assert error["code"] == "unsupported_endpoint" and error["message"] == "no FIM"

    fakes.run_scripted(Script(), scenario, _config(tmp_path))


def test_another_keys_completion_does_not_reuse_the_slots_prompt(tmp_path: Path) -> None:
    async def scenario(s: Services, script: Script) -> None:
        for owner in ("a", "a", "b"):
            await Client("/v1/completions", {"prompt": "hi"}, owner).call(s)
        assert [sent.get("cache_prompt") for _, sent in script.got] == [False, None, False]
        await Client("/tokenize", {"content": "hi"}, "a").call(s)
        assert "cache_prompt" not in script.got[-1][1]  # no slot, no cache: untouched

    fakes.run_scripted(Script(), scenario, _config(tmp_path))
