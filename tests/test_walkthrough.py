"""What a newcomer meets first (issue 22, item 6), the parts that need no llama-server:
the ``hotmodel switch`` output and the README's sample of it, ``--json`` failures, the
``hotmodel models`` table during a switch, and the configs' ports.

The switch's events below are the ones a real CPU-only switch with KV snapshots sent
(the demo's): the leaving model is saved and unloaded while the next one loads.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from hotmodel.cli import cli
from hotmodel.cli.client import _PhasePrinter
from hotmodel.cli.common import API_KEY_ENV
from hotmodel.control.plan import Step, beside_load, plan

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _event(phase: str, status: str, ms: float | None = None, detail: str | None = None) -> Any:
    return {"switch_id": 2, "phase": phase, "status": status, "ms": ms, "detail": detail}


# smollm2 -> gemma3 on the demo, as /admin/switch streamed it (zero_overlap, CPU only)
BESIDE_THE_LOAD = [
    _event("check", "started"),
    _event("check", "done", 0.1),
    _event("drain", "started"),
    _event("drain", "done", 0.0),
    _event("load", "started"),
    _event("save", "started"),
    _event("load", "progress", detail="text_model 0%"),
    _event("save", "done", 28.8, "40 tokens, 923012 bytes"),
    _event("unload", "started"),
    _event("load", "progress", detail="text_model 0%"),  # the router repeats a value
    _event("unload", "done", 1.8, "its process exits while the next model loads"),
    _event("settle", "started"),
    _event("settle", "skipped"),
    _event("load", "progress", detail="text_model 100%"),
    _event("load", "done", 1934.2),
    _event("restore", "started"),
    _event("restore", "skipped", detail="no snapshot of this session for this model"),
    _event("activate", "started"),
    _event("activate", "done", 0.0),
    _event("replay", "started"),
    _event("replay", "done", 2144.4, "34 prompt tokens in 2129.9 ms"),
]


def _printed(events: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], live: bool) -> str:
    printer = _PhasePrinter(quiet=False, live=live)
    for event in events:
        printer.show(event)
    printer.close()
    return capsys.readouterr().out


def test_each_phase_is_printed_once_in_the_plans_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The issue saw ``unload`` twice and ``load`` before ``save``: one line per phase,
    at its end, and the ones that ran beside the load say so."""
    lines = _printed(BESIDE_THE_LOAD, capsys, live=False).splitlines()
    assert lines == [
        "  check     ... done       0.1 ms",
        "  drain     ... done       0.0 ms",
        "  save      ... done      28.8 ms  (beside the load; 40 tokens, 923012 bytes)",
        "  unload    ... done       1.8 ms  (beside the load; its process exits while the "
        "next model loads)",
        "  settle    ... skipped  (beside the load)",
        "  load      ... done    1934.2 ms",
        "  restore   ... skipped  (no snapshot of this session for this model)",
        "  activate  ... done       0.0 ms",
        "  replay    ... done    2144.4 ms  (34 prompt tokens in 2129.9 ms)",
    ], lines
    names = [line.split()[0] for line in lines]
    steps = plan("zero_overlap", "smollm2", "gemma3", kv=True)
    assert names == [s.value for s in steps], names
    assert beside_load(steps, exits_in_background=True) == (Step.SAVE, Step.UNLOAD, Step.SETTLE)


def test_on_a_terminal_the_running_phases_show_on_a_line_that_goes_away(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What is being waited for (and the load's progress, each value once) shows on a
    live line; the lines that stay are the same as without a terminal."""
    loading = [_event("load", "started"), _event("load", "progress", detail="text_model 0%")]
    once = _printed(loading, capsys, live=True)
    assert once.count("text_model 0%") == 1, once
    assert _printed([*loading, loading[-1]], capsys, live=True) == once  # not drawn again
    out = _printed(BESIDE_THE_LOAD, capsys, live=True)
    assert "load ... text_model 100%" in out
    assert "load ... text_model 0%, save ..." in out
    kept = [re.sub(r".*\r", "", line) for line in out.split("\n")]
    assert [line.rstrip() for line in kept if line.strip()] == _printed(
        BESIDE_THE_LOAD, capsys, live=False
    ).splitlines()
    assert out.endswith("\n"), "the live line is taken away at the end"


def test_a_failed_phase_and_the_rollback_are_printed_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = [
        _event("check", "started"),
        _event("check", "done", 0.1),
        _event("load", "started"),
        _event("load", "failed", detail="model 'gemma3' failed to load"),
        _event("rollback", "started"),
        _event("rollback", "done", 900.0, "active: 'smollm2'"),
    ]
    lines = _printed(events, capsys, live=False).splitlines()
    assert lines == [
        "  check     ... done       0.1 ms",
        "  load      ... failed  (model 'gemma3' failed to load)",
        "  rollback  ... done     900.0 ms  (active: 'smollm2')",
    ]


def _readme_switch_sample() -> list[str]:
    text = README.read_text(encoding="utf-8")
    match = re.search(
        r"```sh\nhotmodel switch gemma3 --config configs/demo.toml\n```\n```\n(.*?)```",
        text,
        re.S,
    )
    assert match, "the README's `hotmodel switch` sample is gone"
    return match.group(1).splitlines()


def test_the_readmes_switch_sample_is_what_the_command_prints() -> None:
    """The demo (CPU only, KV snapshots on) prints save and restore too, in this order;
    each sample line is a line the printer writes."""
    sample = _readme_switch_sample()
    phases = [line for line in sample if line.startswith("  ")]
    steps = plan("zero_overlap", "smollm2", "gemma3", kv=True)
    assert [line.split()[0] for line in phases] == [s.value for s in steps]
    beside = {s.value for s in beside_load(steps, exits_in_background=True)}
    line_re = re.compile(
        r"  (?P<phase>\w+) +\.\.\. (?P<status>done|skipped)"
        r"(?: +(?P<ms>\d+\.\d) ms)?(?:  \((?P<detail>.*)\))?$"
    )
    for line in phases:
        m = line_re.match(line)
        assert m, line
        ms = float(m["ms"]) if m["ms"] else None
        detail = m["detail"]
        if m["phase"] in beside:
            assert detail and detail.startswith("beside the load"), line
            detail = detail.removeprefix("beside the load").removeprefix("; ") or None
        assert _line_beside(m["phase"], m["status"], ms, detail, m["phase"] in beside) == line
    assert re.match(r"switched smollm2 -> gemma3 in \d+ ms \(zero_overlap\)$", sample[-2])
    assert sample[-1] == "GPU memory: no GPU visible"


def _line_beside(
    phase: str, status: str, ms: float | None, detail: str | None, beside: bool
) -> str:
    printer = _PhasePrinter(quiet=False, live=False)
    if beside:
        printer.beside[phase] = "load"
    return printer._line(phase, status, {"ms": ms, "detail": detail})


# --- --json: a failure is JSON too ---


class _StandIn:
    """A stand-in server: one canned answer for ``POST /admin/switch``."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        self.content_type = "text/event-stream"
        box = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(box.status)
                self.send_header("content-type", box.content_type)
                self.send_header("content-length", str(len(box.body)))
                self.end_headers()
                self.wfile.write(box.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def sse(self, *events: tuple[str, Any]) -> None:
        self.status, self.content_type = 200, "text/event-stream"
        self.body = b"".join(
            f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events
        )

    def error(self, status: int, error: dict[str, Any]) -> None:
        self.status, self.content_type = status, "application/json"
        self.body = json.dumps({"error": error}).encode()


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[_StandIn]:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    box = _StandIn()
    thread = threading.Thread(target=box.server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield box
    finally:
        box.server.shutdown()
        box.server.server_close()
        thread.join(5)


def _switch_json(url: str, model: str = "gemma3") -> Result:
    return CliRunner().invoke(cli, ["switch", model, "--url", url, "--json"], prog_name="hotmodel")


def _stdout_json(result: Result) -> Any:
    return json.loads(result.stdout)  # the whole of stdout is one JSON document


def test_switch_json_prints_a_refusal_as_the_servers_error_object(stand_in: _StandIn) -> None:
    error = {
        "message": "model 'nosuch' is not a preset (known: gemma3, smollm2)",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    stand_in.error(404, error)
    result = _switch_json(stand_in.url, "nosuch")
    assert result.exit_code == 1
    assert _stdout_json(result) == {"error": error}
    assert "error: model 'nosuch' is not a preset" in result.stderr


def test_switch_json_prints_an_error_event_as_an_error_object(stand_in: _StandIn) -> None:
    stand_in.sse(
        ("phase", _event("check", "started")),
        ("error", {"message": "the router is down"}),
    )
    result = _switch_json(stand_in.url)
    assert result.exit_code == 1
    body = _stdout_json(result)
    assert body["error"]["message"] == "the router is down"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_switch_json_prints_a_failed_report_and_exits_1(stand_in: _StandIn) -> None:
    report = {
        "id": 3,
        "from": "smollm2",
        "to": "gemma3",
        "outcome": "failed",
        "error": "model 'gemma3' failed to load",
        "failed_phase": "load",
        "rolled_back": True,
        "active_after": "smollm2",
        "gpu": {},
    }
    stand_in.sse(("phase", _event("load", "failed")), ("report", report))
    result = _switch_json(stand_in.url)
    assert result.exit_code == 1
    assert _stdout_json(result) == report


def test_json_commands_print_unreachable_as_json() -> None:
    from hotmodel.router.supervisor import free_port

    port = str(free_port("127.0.0.1"))
    for args in (["switch", "gemma3"], ["status"], ["models"], ["reload"], ["sessions", "list"]):
        result = CliRunner().invoke(cli, [*args, "--port", port, "--json"], prog_name="hotmodel")
        assert result.exit_code == 4, (args, result.output)
        assert _stdout_json(result)["error"]["code"] == "unreachable", args


def test_a_bad_config_with_json_is_json_and_exit_3(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'x'\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["switch", "gemma3", "-c", str(bad), "--json"])
    assert result.exit_code == 3
    body = _stdout_json(result)
    assert body["error"]["code"] == "invalid_config"
    assert str(bad) in body["error"]["message"]


# --- hotmodel models: `*` on the model that serves now ---


def test_the_active_model_is_not_active_while_the_router_has_it_unloaded() -> None:
    from hotmodel.api.status import really_active

    assert really_active("smollm2", {"smollm2": "loaded", "gemma3": "unloaded"}) == "smollm2"
    for between in ("unloaded", "unloading", "loading"):  # a switch's unload .. activate
        assert really_active("smollm2", {"smollm2": between, "gemma3": "loading"}) is None
    assert really_active("smollm2", {}) == "smollm2"  # no answer from the router
    assert really_active(None, {"smollm2": "loaded"}) is None


# --- hotmodel reload: a missing GGUF is refused like serve refuses it ---


def test_reload_checks_the_files_of_new_and_edited_presets_and_a_new_default(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from hotmodel.config import load_config
    from hotmodel.control.reload import check_new_model_files
    from hotmodel.errors import ConfigError
    from tests.conftest import write_config

    tiny = tiny_models["tiny"]
    config = write_config(tmp_path, {"tiny": tiny, "gone": tmp_path / "gone.gguf"}, "tiny", port=1)
    old = load_config(config)
    check_new_model_files(old, old)  # unchanged: serve accepted it, so does a reload
    ini = tmp_path / "models.ini"
    ini.write_text(ini.read_text() + "\n[mine]\nmodel = nowhere/mine.gguf\n", encoding="utf-8")
    with pytest.raises(ConfigError) as added:
        check_new_model_files(old, load_config(config))
    assert str(ini) in str(added.value) and "[mine]" in str(added.value)
    assert "model" in str(added.value) and "model file not found" in str(added.value)
    ini.write_text(ini.read_text().replace("nowhere/mine.gguf", str(tiny)), encoding="utf-8")
    check_new_model_files(old, load_config(config))  # the file is there now
    toml = config.read_text().replace('default_model = "tiny"', 'default_model = "gone"')
    config.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[gone\]"):
        check_new_model_files(old, load_config(config))


# --- configs ---


def test_only_the_demo_takes_the_demos_port() -> None:
    """The README serves the demo on 18080: a config copied for your own models must not
    collide with a demo running beside it. The cluster demo (the demo as two nodes, one
    at a time with it) takes 18080 and 18081."""
    import tomllib

    ports = {
        path.name: tomllib.loads(path.read_text(encoding="utf-8"))["server"]["port"]
        for path in sorted((ROOT / "configs").glob("*.toml"))
    }
    assert ports.pop("demo.toml") == 18080
    assert (ports.pop("cluster-a.toml"), ports.pop("cluster-b.toml")) == (18080, 18081)
    assert ports and 18080 not in ports.values(), ports
    assert "port 18090" in README.read_text(encoding="utf-8")
    assert ports["models.example.toml"] == 18090


def test_your_own_models_names_the_chat_template_keys_llama_server_takes() -> None:
    """A GGUF without a chat template (the demo's Gemma) needs ``chat-template-file``:
    the README says so, with keys the INI accepts (hotmodel resolves that one's path)."""
    from hotmodel.presets import PATH_KEYS

    text = README.read_text(encoding="utf-8")
    own = text[text.index("## Your own models") : text.index("## Commands")]
    assert "chat-template-file = gemma3.jinja" in own
    assert "chat-template = NAME" in own
    assert "chat-template-file" in PATH_KEYS  # resolved against the INI's folder
    demo_ini = (ROOT / "configs" / "demo.ini").read_text(encoding="utf-8")
    assert "chat-template-file = gemma3.jinja" in demo_ini
