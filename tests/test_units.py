"""Pure pieces tested on literal samples: router answers, argv, log tails, error mapping."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotmodel.config import load_config
from hotmodel.errors import (
    ConfigError,
    HotModelError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotActiveError,
    ModelNotFoundError,
    RouterExitedError,
    StoreError,
    StoreUnavailableError,
    http_error_for,
)
from hotmodel.router.client import RouterClient
from hotmodel.router.lifecycle import ModelLifecycle
from hotmodel.router.models import ModelState, error_message, parse_models
from hotmodel.router.supervisor import read_tail, router_argv

ROOT = Path(__file__).resolve().parent.parent

# Trimmed from a real GET /models of the pinned llama-server (2026-11-25).
MODELS_SAMPLE: dict[str, Any] = {
    "data": [
        {
            "id": "bad",
            "status": {
                "value": "unloaded",
                "args": [
                    "llama-server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "33985",
                    "--alias",
                    "bad",
                ],
                "exit_code": 1,
                "failed": True,
            },
        },
        {
            "id": "smol",
            "status": {
                "value": "loaded",
                "args": [
                    "llama-server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "38293",
                    "--alias",
                    "smol",
                ],
            },
        },
        {"id": "gemma", "status": {"value": "loading"}},
        {"no-id": True},
    ],
    "object": "list",
}


def test_parse_models_reads_status_failure_and_port() -> None:
    models = parse_models(MODELS_SAMPLE)
    assert set(models) == {"bad", "smol", "gemma"}
    assert models["bad"].state is ModelState.UNLOADED
    assert models["bad"].failed is True and models["bad"].exit_code == 1
    assert models["smol"].state is ModelState.LOADED and models["smol"].port == 38293
    assert models["smol"].failed is False and models["smol"].exit_code is None
    assert models["gemma"].port is None


@pytest.mark.parametrize("payload", [[], {"data": "x"}, None, {"models": []}])
def test_parse_models_rejects_other_shapes(payload: Any) -> None:
    with pytest.raises(Exception, match="unexpected GET /models answer"):
        parse_models(payload)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"error":{"code":400,"message":"model is not loaded",'
            b'"type":"invalid_request_error"}}',
            "model is not loaded",
        ),
        (b'{"error":"plain"}', "plain"),
        (b"proxy error: Failed to read connection", "proxy error: Failed to read connection"),
        (b"", "(empty answer)"),
        (b'{"detail": 1}', '{"detail": 1}'),
    ],
)
def test_error_message_of_router_answers(body: bytes, message: str) -> None:
    assert error_message(body) == message


def _scripted_router(
    statuses: list[dict[str, Any]], log_tail: str = ""
) -> tuple[ModelLifecycle, list[str]]:
    """A router that answers GET /models from a script (one entry per call)."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        status = statuses[min(len(calls) - 1, len(statuses) - 1)]
        return httpx.Response(200, json={"data": [{"id": "m", "status": status}]})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return ModelLifecycle(RouterClient(http, "http://router"), None, lambda: log_tail), calls


def test_wait_loaded_returns_once_loaded() -> None:
    client, calls = _scripted_router(
        [{"value": "loading"}, {"value": "loading"}, {"value": "loaded"}]
    )
    status = asyncio.run(client.wait_loaded("m", timeout=5))
    assert status.state is ModelState.LOADED
    assert calls == ["GET /models"] * 3


def test_wait_loaded_reports_failure_with_log_tail() -> None:
    client, _ = _scripted_router(
        [{"value": "loading"}, {"value": "unloaded", "failed": True, "exit_code": 1}],
        log_tail="gguf_init failed",
    )
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(client.wait_loaded("m", timeout=5))
    assert str(info.value) == (
        "model 'm' failed to load (exit code 1)\n--- llama-server log tail ---\ngguf_init failed"
    )


def test_wait_loaded_has_a_deadline() -> None:
    client, _ = _scripted_router([{"value": "loading"}])
    with pytest.raises(
        ModelLoadError, match=r"did not reach 'loaded' within 0.05s \(\[switch\] load_timeout"
    ):
        asyncio.run(client.wait_loaded("m", timeout=0.05))


def test_a_background_unload_returns_at_once_and_a_load_waits_for_its_exit() -> None:
    client, calls = _scripted_router(
        [{}, {"value": "loaded"}, {"value": "unloaded"}, {}, {"value": "loaded"}]
    )

    async def main() -> None:
        assert await client.unload("m", 5, background=True)
        assert calls == ["POST /models/unload"]  # not waited for
        assert client.exiting == {"m"}
        await client.load("m", 5)  # the router would take m, still exiting, as loaded
        assert client.exiting == frozenset()

    asyncio.run(main())
    assert calls == [
        "POST /models/unload",
        "GET /models",
        "GET /models",  # unloaded: gone
        "POST /models/load",
        "GET /models",
    ]


def test_an_exit_not_seen_in_time_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    client, _ = _scripted_router([{}, {"value": "loaded"}])

    async def main() -> None:
        await client.unload("m", 0.05, background=True)
        await client.exited()
        await client.exited()  # forgotten once seen: nothing left to wait for

    asyncio.run(main())
    assert "model 'm': its unload was not seen to finish: model 'm' did not reach" in caplog.text
    assert caplog.text.count("was not seen to finish") == 1


def test_closing_stops_waiting_for_exits() -> None:
    client, calls = _scripted_router([{}, {"value": "loaded"}])

    async def main() -> None:
        await client.unload("m", 60, background=True)
        waiter = asyncio.create_task(client.exited())
        await asyncio.sleep(0.05)
        await asyncio.wait_for(client.aclose(), 1)
        await asyncio.wait_for(waiter, 1)  # a waiter is let go, not cancelled
        assert client.exiting == frozenset()
        await client.exited()  # nothing is left

    asyncio.run(main())
    assert calls[0] == "POST /models/unload"


def test_router_argv_is_derived_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "m.ini").write_text("[a]\nmodel = a.gguf\n")
    (tmp_path / "c.toml").write_text(
        '[router]\nmodels_preset = "m.ini"\ndefault_model = "a"\nmodels_max = 2\nparallel = 3\n'
        'ctx_size = 8192\ncache_type_k = "q8_0"\ncache_type_v = "q4_0"\n'
        'extra_args = ["--flash-attn", "on"]\n'
    )
    cfg = load_config(tmp_path / "c.toml")
    argv = router_argv(cfg, Path("/bin/llama-server"), Path("/s/p.ini"), 4242)
    assert argv == [
        "/bin/llama-server",
        "--models-preset",
        "/s/p.ini",
        "--models-max",
        "2",
        "--no-models-autoload",
        "--host",
        "127.0.0.1",
        "--port",
        "4242",
        "--parallel",
        "3",
        "--ctx-size",
        "8192",
        "--cache-type-k",
        "q8_0",
        "--cache-type-v",
        "q4_0",
        "--flash-attn",
        "on",
    ]
    # room for a leaving model's process to exit while the next one loads
    spare = router_argv(cfg, Path("/bin/llama-server"), Path("/s/p.ini"), 4242, spare=True)
    assert spare[spare.index("--models-max") + 1] == "3"


def test_read_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert read_tail(log, 3) == "line 97\nline 98\nline 99"
    assert read_tail(tmp_path / "missing.log") == ""


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (InvalidRequestError("x"), 400, "invalid_request"),
        (ModelNotFoundError("x"), 404, "model_not_found"),
        (ModelNotActiveError("x"), 409, "model_not_active"),
        (RouterExitedError("x"), 503, "router_unavailable"),
        (ModelLoadError("x"), 503, "router_unavailable"),
        (ConfigError("f.toml", "x"), 400, "invalid_config"),  # a reload of a bad file
        (StoreUnavailableError("x"), 503, "store_unavailable"),  # PostgreSQL unreachable
        (StoreError("x"), 500, "store_error"),
        (HotModelError("x"), 500, "internal_error"),
    ],
)
def test_http_error_mapping(exc: Exception, status: int, code: str) -> None:
    mapped = http_error_for(exc)  # type: ignore[arg-type]
    assert (mapped.status, mapped.code) == (status, code)


def test_config_error_names_file_section_key() -> None:
    assert (
        str(ConfigError("a.toml", "bad", section="router", key="port"))
        == "a.toml [router] port: bad"
    )
    assert json.dumps(str(ConfigError("a.ini", "bad", section="x"))) == '"a.ini [x]: bad"'


def test_proxy_socket_turns_nagle_off_on_accepted_connections() -> None:
    """Without TCP_NODELAY every small answer waited ~40 ms for a delayed ACK."""
    import socket

    from hotmodel.server import bind_socket

    async def scenario() -> int:
        sock = bind_socket("127.0.0.1", 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted = writer.get_extra_info("socket")
            seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(seen, 5)
            writer.close()
        return value

    assert asyncio.run(scenario()) != 0


def test_router_send_retries_once_on_a_closed_keepalive_connection() -> None:
    from hotmodel.router.client import send

    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"ok": True})

    async def scenario() -> int:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            resp = await send(http, http.build_request("POST", "http://router/x", json={}))
            return resp.status_code

    assert asyncio.run(scenario()) == 200
    assert len(attempts) == 2


def test_model_load_error_keeps_summary_and_log_tail_apart() -> None:
    err = ModelLoadError("model 'm' failed to load (exit code 1)", "gguf_init failed")
    assert err.summary == "model 'm' failed to load (exit code 1)"
    assert err.log_tail == "gguf_init failed"
    assert str(err) == (
        "model 'm' failed to load (exit code 1)\n--- llama-server log tail ---\ngguf_init failed"
    )
    assert str(ModelLoadError("no tail")) == "no tail"


def test_parse_devices_reads_llama_servers_list() -> None:
    from hotmodel.router.options import parse_devices

    assert parse_devices("load_backend: loaded CPU backend\nAvailable devices:\n  (none)\n") == ()
    cuda = (
        "ggml_cuda_init: found 2 CUDA devices:\nAvailable devices:\n"
        "  CUDA0: NVIDIA H100 80GB HBM3 (81089 MiB, 80500 MiB free)\n"
        "  CUDA1: NVIDIA H100 80GB HBM3 (81089 MiB, 80500 MiB free)\n"
    )
    assert parse_devices(cuda) == ("CUDA0", "CUDA1")
    # an older binary without --list-devices: unknown, so treated as having a device
    assert parse_devices("error: invalid argument: --list-devices\n") is None


def test_llama_server_help_gives_every_option_name_and_variable() -> None:
    from hotmodel.router.options import parse_help

    text = (
        "----- common params -----\n"
        "-h,    --help, --usage                  print usage and exit\n"
        "-c,    --ctx-size N                     size of the prompt context\n"
        "                                        (env: LLAMA_ARG_CTX_SIZE)\n"
        "--spec-draft-hf, -hfd, --hf-repo-draft <user>/<model>[:quant]\n"
        "                                        Same as --hf-repo-x (default: unused)\n"
        "-fit,  --fit [on|off]                   whether to adjust unset arguments\n"
    )
    assert parse_help(text) == {
        "h", "help", "usage", "c", "ctx-size", "LLAMA_ARG_CTX_SIZE",
        "spec-draft-hf", "hfd", "hf-repo-draft", "fit",
    }  # fmt: skip


def test_preset_keys_are_checked_against_the_binarys_options(tmp_path: Path) -> None:
    from hotmodel.errors import ConfigError
    from hotmodel.presets import load_presets
    from hotmodel.router.options import check_preset_keys

    ini = tmp_path / "m.ini"
    ini.write_text("version = 1\n[*]\nno-warmup = true\n[a]\nmodel = a.gguf\nc = 512\nzzz = 1\n")
    presets = load_presets(ini)
    known = frozenset({"model", "c", "warmup"})
    with pytest.raises(ConfigError, match=r"m\.ini \[a\] zzz: llama-server has no option 'zzz'"):
        check_preset_keys(presets, known)
    check_preset_keys(presets, None)  # the help could not be read: llama-server decides
    check_preset_keys(presets, known | {"zzz"})
