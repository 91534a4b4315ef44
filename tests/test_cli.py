"""The ``hotmodel`` command line: finding the server, exit codes, ``--json``, error lines.

Most tests run the commands in-process with click's ``CliRunner``: usage and
config errors need no server, "unreachable" needs a port nobody listens on,
and the answers a real server cannot be made to give on demand (an older
server without an endpoint, a refused key, something that is not hotmodel)
come from a small stand-in HTTP server. The last tests run the real
``hotmodel serve`` with the real llama-server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from hotmodel.cli import cli
from hotmodel.cli.client import active_line, human_size, models_table
from hotmodel.cli.common import API_KEY_ENV, Target, proxy_url
from hotmodel.cli.local import with_overrides
from hotmodel.cli.sessions import transcript_line
from hotmodel.config import load_config
from hotmodel.router.supervisor import free_port
from tests.conftest import (
    HotmodelProcess,
    run_hotmodel,
    wait_healthy,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent
SERVE = [sys.executable, "-m", "hotmodel", "serve"]
CLIENT_COMMANDS = [
    ["status"],
    ["models"],
    ["reload"],
    ["switch", "gemma3"],
    ["sessions", "list"],
    ["sessions", "show", "s1"],
    ["sessions", "delete", "s1"],
]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="hotmodel")


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (API_KEY_ENV, "HOTMODEL_API_KEYS", "HOTMODEL_ADMIN_KEYS"):
        monkeypatch.delenv(name, raising=False)


# --- a stand-in server: canned answers, and what the CLI sent ---


@dataclass
class Canned:
    """Answers by (method, path); every request's method, path and headers are kept."""

    answers: dict[tuple[str, str], tuple[int, bytes, str]] = field(default_factory=dict)
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def json(self, method: str, path: str, status: int, body: Any) -> None:
        self.answers[(method, path)] = (status, json.dumps(body).encode(), "application/json")


def _handler(canned: Canned) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            canned.seen.append((self.command, self.path, dict(self.headers.items())))
            # hotmodel's own answer for a route it does not have
            missing = json.dumps(
                {
                    "error": {
                        "message": f"no route {self.command} {self.path}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "not_found",
                    }
                }
            ).encode()
            status, body, ctype = canned.answers.get(
                (self.command, self.path), (404, missing, "application/json")
            )
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _answer  # noqa: N815 (http.server's names)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def canned() -> Iterator[Canned]:
    box = Canned()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(box))
    box.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield box
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _error(status: int, message: str, code: str) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }


# --- usage, config, unreachable: no server needed ---


@pytest.mark.parametrize("args", CLIENT_COMMANDS)
def test_a_client_command_without_a_server_address_is_a_usage_error(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "give --config FILE" in result.stderr and "--url URL or --port N" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--bogus"],
        ["models", "--port", "0"],
        ["status", "--url", "localhost:18080"],
        ["switch"],
        ["serve", "--config", "x.toml", "--log-format", "xml"],
        ["serve", "--config", "x.toml", "--log-level", "loud"],
        ["sessions", "show"],
        ["nosuchcommand"],
    ],
)
def test_bad_flags_and_arguments_exit_2(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "Usage: hotmodel" in result.stderr


def test_config_errors_exit_3_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    for args in (["status", "--config", str(missing)], ["serve", "--config", str(missing)]):
        result = invoke(*args)
        assert result.exit_code == 3, result.output
        assert result.stderr.strip() == f"error: {missing}: config file not found"
    broken = write_config(tmp_path, {"m": tmp_path / "m.gguf"}, "m", router="parallel = 0")
    result = invoke("models", "--config", str(broken))
    assert result.exit_code == 3
    assert "[router] parallel: expected a value >= 1, got 0" in result.stderr


@pytest.mark.parametrize("args", CLIENT_COMMANDS)
def test_nobody_listening_exits_4_with_a_hint(args: list[str]) -> None:
    port = free_port("127.0.0.1")
    result = invoke(*args, "--port", str(port))
    assert result.exit_code == 4, result.output
    assert result.stderr.strip() == (
        f"error: no hotmodel answers at http://127.0.0.1:{port} "
        "(is `hotmodel serve` running? started with --port?)"
    )


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(httpx, "request", interrupted)
    result = invoke("status", "--port", "18080")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr
    monkeypatch.setattr(httpx, "stream", interrupted)
    result = invoke("switch", "gemma3", "--port", "18080")
    assert result.exit_code == 130
    assert "the switch goes on in the server" in result.stderr


# --- where the server is, and which key goes with the request ---


def test_url_beats_port_beats_the_config(tmp_path: Path, canned: Canned) -> None:
    config = write_config(tmp_path, {"m": tmp_path / "m.gguf"}, "m", port=free_port("127.0.0.1"))
    canned.json("GET", "/admin/status", 200, {"state": "ready", "active_model": "m"})
    port = canned.url.rsplit(":", 1)[1]
    by_port = invoke("status", "--config", str(config), "--port", port, "--json")
    assert by_port.exit_code == 0, by_port.output
    assert json.loads(by_port.stdout)["active_model"] == "m"
    dead = str(free_port("127.0.0.1"))
    # --url wins over both; the OpenAI base URL (".../v1/") is accepted as it is
    by_url = invoke("status", "-c", str(config), "--port", dead, "--url", canned.url + "/v1/")
    assert by_url.exit_code == 0, by_url.output
    assert f"url: {canned.url}" in by_url.stdout
    assert [(m, p) for m, p, _ in canned.seen] == [("GET", "/admin/status")] * 2


def test_proxy_url_reaches_a_wildcard_listener_on_this_machine() -> None:
    assert proxy_url("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert proxy_url("::1", 8080) == "http://[::1]:8080"
    assert proxy_url("example.org", 80) == "http://example.org:80"


def test_keys_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(
        write_config(
            tmp_path,
            {"m": tmp_path / "m.gguf"},
            "m",
            tail='[security]\napi_keys = ["client-key-000001"]\nadmin_keys = ["admin-key-0000001"]',
        )
    )
    with_config = Target("http://x", config)
    bare = Target("http://x", None)
    assert with_config.headers(admin=True) == {"authorization": "Bearer admin-key-0000001"}
    assert with_config.headers(admin=False) == {"authorization": "Bearer admin-key-0000001"}
    assert bare.headers(admin=True) == {} == bare.headers(admin=False)
    monkeypatch.setenv(API_KEY_ENV, "mine")
    assert with_config.headers(admin=False) == {"authorization": "Bearer mine"}
    assert with_config.headers(admin=True) == {"authorization": "Bearer admin-key-0000001"}
    assert bare.headers(admin=True) == {"authorization": "Bearer mine"}


# --- answers a real server cannot be made to give on demand ---


def test_reload_against_an_older_server_says_so(canned: Canned) -> None:
    result = invoke("reload", "--url", canned.url)
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: the server at {canned.url} has no POST /admin/reload: it runs an older "
        "hotmodel (restart it with this version)"
    )
    assert "Traceback" not in result.output


def test_reload_prints_applied_and_restart_needed(canned: Canned) -> None:
    answer = {
        "changed": True,
        "applied": ["switch.auto", "session.max_prompt_chars"],
        "restart_needed": ["server.port"],
        "presets_changed": ["gemma3"],
        "reload_active": False,
        "note": "the router reads the new presets at the next switch or unload",
    }
    canned.json("POST", "/admin/reload", 200, answer)
    result = invoke("reload", "--url", canned.url)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "applied (2):",
        "  switch.auto",
        "  session.max_prompt_chars",
        "presets changed (1):",
        "  gemma3",
        "need a restart of `hotmodel serve` to take effect (1):",
        "  server.port",
        "note: the router reads the new presets at the next switch or unload",
    ]
    as_json = invoke("reload", "--url", canned.url, "--json")
    assert json.loads(as_json.stdout) == answer
    unchanged = {"changed": False, "applied": [], "restart_needed": [], "presets_changed": []}
    canned.json("POST", "/admin/reload", 200, unchanged)
    assert invoke("reload", "--url", canned.url).stdout == "config unchanged: nothing to apply\n"


def test_reload_whose_model_reload_failed_exits_1(canned: Canned) -> None:
    report = {
        "outcome": "failed",
        "from": "smollm2",
        "to": "smollm2",
        "error": "model 'smollm2' failed to load",
        "rolled_back": False,
        "active_after": None,
        "gpu": {},
    }
    answer = {"changed": True, "applied": [], "presets_changed": ["smollm2"], "switch": report}
    canned.json("POST", "/admin/reload", 200, answer)
    result = invoke("reload", "--url", canned.url)
    assert result.exit_code == 1
    assert "switch smollm2 -> smollm2 FAILED: model 'smollm2' failed to load" in result.stdout
    assert invoke("reload", "--url", canned.url, "--json").exit_code == 1


def test_reload_refused_exits_1_with_the_servers_message(canned: Canned) -> None:
    message = "configs/x.toml [router] parallel: expected an integer, got 'two'"
    canned.json("POST", "/admin/reload", 400, _error(400, message, "invalid_config"))
    result = invoke("reload", "--url", canned.url)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {message}"


def test_refused_keys_are_one_clear_line(canned: Canned) -> None:
    canned.json("GET", "/v1/models", 401, _error(401, "a valid API key is required", "x"))
    canned.json("GET", "/admin/status", 403, _error(403, "needs an admin key", "y"))
    no_key = invoke("models", "--url", canned.url)
    assert no_key.exit_code == 1
    assert "a valid API key is required (HTTP 401; the CLI sent no key)" in no_key.stderr
    assert f"set {API_KEY_ENV}" in no_key.stderr
    wrong = CliRunner(env={API_KEY_ENV: "wrong"}).invoke(cli, ["models", "--url", canned.url])
    assert f"(HTTP 401; the CLI sent the key in {API_KEY_ENV})" in wrong.stderr
    client_key = CliRunner(env={API_KEY_ENV: "client-1"}).invoke(
        cli, ["status", "--url", canned.url]
    )
    assert client_key.exit_code == 1
    assert "needs an admin key (HTTP 403): this command needs an admin key" in client_key.stderr
    assert canned.seen[-1][2]["authorization"] == "Bearer client-1"
    assert "Traceback" not in no_key.output + client_key.output


def test_something_that_is_not_hotmodel(canned: Canned) -> None:
    canned.answers[("GET", "/admin/status")] = (200, b"<html>hello</html>", "text/html")
    result = invoke("status", "--url", canned.url)
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {canned.url} answered GET /admin/status with HTTP 200 and no hotmodel JSON: "
        "is it hotmodel? (see --url/--port)"
    )
    canned.answers[("GET", "/v1/models")] = (200, b"[1, 2]", "application/json")
    listed = invoke("models", "--url", canned.url)
    assert listed.exit_code == 1 and "and no hotmodel JSON" in listed.stderr
    assert "Traceback" not in result.output + listed.output


def test_json_on_every_command_that_prints_data(canned: Canned) -> None:
    session = {
        "id": "s1",
        "system_prompt": None,
        "created_at": 1.0,
        "updated_at": 2.0,
        "messages": [{"role": "user", "content": "hi", "model": None, "created_at": 1.0}],
    }
    models = {"object": "list", "data": [{"id": "m", "active": True, "size_bytes": 5}]}
    canned.json("GET", "/admin/status", 200, {"state": "ready"})
    canned.json("GET", "/v1/models", 200, models)
    canned.json("GET", "/v1/sessions", 200, {"object": "list", "data": [session]})
    canned.json("GET", "/v1/sessions/s1", 200, session)
    canned.json("DELETE", "/v1/sessions/s1", 200, {"id": "s1", "deleted": True})
    expected = {
        ("status",): {"state": "ready"},
        ("models",): models,
        ("sessions", "list"): [session],
        ("sessions", "show", "s1"): session,
        ("sessions", "delete", "s1"): {"id": "s1", "deleted": True},
    }
    for args, body in expected.items():
        result = invoke(*args, "--url", canned.url, "--json")
        assert result.exit_code == 0, (args, result.output)
        assert json.loads(result.stdout) == body, args


# --- what people read ---


def test_models_table_and_sizes() -> None:
    rows = models_table(
        [
            {"id": "smollm2", "status": "loaded", "active": True, "size_bytes": 100_000_000},
            {"id": "remote", "status": "unloaded", "active": False, "size_bytes": None},
            {"id": "napping", "status": "unloaded", "parked": True, "size_bytes": 1024},
        ]
    )
    assert rows == [
        "PRESET   STATUS    ACTIVE       SIZE",
        "smollm2  loaded    *        95.4 MiB",
        "remote   unloaded                  -",
        "napping  unloaded  idle      1.0 KiB",
    ]
    assert active_line({"active_model": "a", "parked_model": None}) == "a"
    assert active_line({"active_model": None, "parked_model": "b"}).startswith(
        "none (b was unloaded for idleness"
    )
    assert active_line({"active_model": None}) == "none"
    assert human_size(512) == "512 B"
    assert human_size(3 * 1024**3) == "3.0 GiB"
    assert human_size(5 * 1024**4) == "5120.0 GiB"
    assert human_size(None) == "-" == human_size(True)


def test_transcript_line() -> None:
    line = transcript_line(
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a"}, {"type": "image_url"}],
            "model": "gemma3",
            "created_at": 0.0,
        }
    )
    assert line.endswith("] assistant (gemma3): a <image_url>")


def test_serve_flags_override_the_config(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {"m": tmp_path / "m.gguf"}, "m"))
    changed = with_overrides(config, 1234, "json", "debug")
    assert (changed.server.port, changed.server.log_format, changed.server.log_level) == (
        1234,
        "json",
        "debug",
    )
    assert changed.router == config.router
    assert with_overrides(config) is config


def test_the_demo_lets_a_chat_ui_pick_the_model() -> None:
    demo = load_config(ROOT / "configs" / "demo.toml")
    assert demo.switch.auto is True
    text = (ROOT / "configs" / "demo.toml").read_text(encoding="utf-8")
    assert "model picker" in text


def test_python_dash_m_and_version() -> None:
    out = run_hotmodel("--version")
    assert out.returncode == 0 and out.stdout.startswith("hotmodel, version ")


# --- against the real server ---


@pytest.mark.slow
def test_models_lists_presets_with_status_active_and_size(
    smol_server: HotmodelProcess, real_models: dict[str, Path]
) -> None:
    raw = run_hotmodel("models", "--config", str(smol_server.config), "--json")
    assert raw.returncode == 0, raw.stderr
    entries = {m["id"]: m for m in json.loads(raw.stdout)["data"]}
    assert set(entries) == {"smollm2", "gemma3"}
    assert entries["smollm2"]["active"] is True and entries["gemma3"]["active"] is False
    assert entries["smollm2"]["status"] == "loaded"
    for name in entries:
        assert entries[name]["size_bytes"] == real_models[name].stat().st_size
    table = run_hotmodel("models", "--url", smol_server.base_url).stdout.splitlines()
    assert table[0].split() == ["PRESET", "STATUS", "ACTIVE", "SIZE"]
    smol_row = next(r for r in table if r.startswith("smollm2"))
    assert smol_row.split()[1:3] == ["loaded", "*"] and smol_row.endswith("MiB")


@pytest.mark.slow
def test_sessions_show_json_against_the_real_server(smol_server: HotmodelProcess) -> None:
    resp = httpx.post(
        smol_server.base_url + "/v1/chat/completions",
        headers={"x-session-id": "cli-json"},
        json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    port = smol_server.base_url.rsplit(":", 1)[1]
    shown = run_hotmodel("sessions", "show", "cli-json", "--port", port, "--json")
    assert shown.returncode == 0, shown.stderr
    export = json.loads(shown.stdout)
    assert export["id"] == "cli-json"
    assert [m["role"] for m in export["messages"]] == ["user", "assistant"]
    assert export["messages"][1]["model"] == "smollm2"
    gone = run_hotmodel("sessions", "delete", "cli-json", "--port", port, "--json")
    assert json.loads(gone.stdout) == {"id": "cli-json", "deleted": True}


@pytest.mark.slow
def test_reload_of_an_unchanged_config_against_the_real_server(
    smol_server: HotmodelProcess,
) -> None:
    out = run_hotmodel("reload", "--config", str(smol_server.config))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "config unchanged: nothing to apply\n"


@pytest.mark.slow
def test_status_finds_a_server_started_with_port_and_log_level(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path
) -> None:
    """The first steps of the issue: `serve --port N`, then `status --config F` must not
    silently ask the config's port; `status --port N` finds it."""
    config = write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny")
    port = free_port("127.0.0.1")
    out_file = tmp_path / "serve.log"
    with out_file.open("w") as out:
        proc = subprocess.Popen(
            [*SERVE, "-c", str(config), "--port", str(port), "--log-level", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, out_file)
        found = run_hotmodel("status", "--config", str(config), "--port", str(port))
        assert found.returncode == 0, found.stderr
        assert "active model: tiny" in found.stdout
        assert f"url: http://127.0.0.1:{port}" in found.stdout
        wrong = run_hotmodel("status", "--config", str(config))
        assert wrong.returncode == 4
        assert "started with --port?" in wrong.stderr
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert code == 0
    log = out_file.read_text(encoding="utf-8")
    assert "hotmodel ready on" not in log  # an info line: --log-level warning hides it
