"""Start-up, shutdown and faults of `hotmodel serve`, against the real llama-server.

Each test works in its own folder, and copies the model files it uses there,
so "no process is left" can be checked by looking for any process whose
command line mentions that folder (the router names its presets file, each
model process names its GGUF file).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import (
    HotmodelProcess,
    assert_all_gone,
    run_hotmodel,
    start_hotmodel,
    write_config,
)

pytestmark = pytest.mark.slow  # drives the real llama-server

HELLO = [{"role": "user", "content": "hello"}]


def _procs_mentioning(folder: Path) -> list[psutil.Process]:
    needle = str(folder)
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(needle in arg for arg in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [p for p in found if p.pid != os.getpid()]


def _assert_nothing_left(folder: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := _procs_mentioning(folder)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, [" ".join(p.cmdline()) for p in left]


def _copy(model: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(model, folder / model.name))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_leaves_no_llama_server(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path, sig: int
) -> None:
    models = tmp_path / "models"
    config = write_config(tmp_path, {"tiny": _copy(tiny_models["tiny"], models)}, "tiny")
    hp = start_hotmodel(config)
    try:
        assert len(hp.router_pids) >= 2, "expected the router and one model process"
        assert _procs_mentioning(tmp_path)
    finally:
        code = hp.stop(sig)
    assert code == 0, hp.output()
    assert_all_gone(hp.router_pids)
    _assert_nothing_left(tmp_path)
    assert "stopped" in hp.output()


def _serving_smollm2(
    tmp_path: Path, real_models: dict[str, Path], shutdown_timeout: float
) -> HotmodelProcess:
    config = write_config(
        tmp_path,
        {"smollm2": _copy(real_models["smollm2"], tmp_path / "m")},
        "smollm2",
        server=f"shutdown_timeout_seconds = {shutdown_timeout}",
    )
    return start_hotmodel(config)


def test_a_second_ctrl_c_forces_the_exit_and_leaves_nothing(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    """A stream is open and the graceful shutdown would wait 120 s for it: the second
    SIGINT kills the router tree at once and hotmodel exits without waiting."""
    hp = _serving_smollm2(tmp_path, real_models, shutdown_timeout=120)
    body = {"messages": HELLO, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", hp.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        next(r.iter_raw())  # generating
        hp.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while "a second Ctrl-C forces it" not in hp.output():
            assert time.monotonic() < deadline, hp.output()
            time.sleep(0.02)
        hp.proc.send_signal(signal.SIGINT)
        assert hp.stop(timeout=30) == 0, hp.output()  # far less than the 120 s grace
    assert "forcing the exit" in hp.output()
    # a forced exit is not a crash: no recovery was started
    assert "exited unexpectedly" not in hp.output() and "recover" not in hp.output()
    assert_all_gone(hp.router_pids)
    _assert_nothing_left(tmp_path)


def test_a_stream_open_at_the_stop_deadline_ends_with_an_error_event(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    """Found by a new-user pass: at the graceful deadline uvicorn cancelled the stream bare
    (no last event, a traceback in the log). hotmodel now ends it itself, as a switch does."""
    hp = _serving_smollm2(tmp_path, real_models, shutdown_timeout=1)
    body = {"messages": HELLO, "max_tokens": 3000, "stream": True, "ignore_eos": True}
    lines = []
    with httpx.stream("POST", hp.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 4:  # generating
                hp.proc.send_signal(signal.SIGINT)
    assert hp.stop(timeout=30) == 0, hp.output()
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert events[-1]["error"]["code"] == "shutting_down", lines[-3:]
    assert "Traceback" not in hp.output() and "Exception in ASGI" not in hp.output()
    assert "ended 1 open request(s) at the stop deadline" in hp.output()
    assert_all_gone(hp.router_pids)


def test_stop_during_startup_leaves_nothing(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    # Gemma takes seconds to load: SIGTERM arrives while the default model is loading.
    config = write_config(
        tmp_path, {"gemma3": _copy(real_models["gemma3"], tmp_path / "m")}, "gemma3"
    )
    hp = start_hotmodel(config, wait=False)
    deadline = time.monotonic() + 30
    while len(hp.descendants()) < 2:  # router + the model process it spawned
        assert hp.proc.poll() is None, hp.output()
        assert time.monotonic() < deadline, hp.output()
        time.sleep(0.02)
    assert hp.stop(signal.SIGTERM) == 130, hp.output()
    assert "nothing is left running" in hp.output()
    _assert_nothing_left(tmp_path)


def test_real_gemma_as_default_model(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path
) -> None:
    config = write_config(tmp_path, {"gemma3": real_models["gemma3"]}, "gemma3")
    hp = start_hotmodel(config)
    try:
        resp = httpx.post(
            hp.base_url + "/v1/chat/completions",
            timeout=60,
            json={"messages": HELLO, "max_tokens": 8},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == "gemma3"
        assert resp.json()["choices"][0]["message"]["content"]
    finally:
        assert hp.stop() == 0


def test_default_model_that_is_no_gguf_is_refused_before_anything_starts(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path
) -> None:
    broken = _copy(tiny_models["garbage"], tmp_path / "models")
    config = write_config(tmp_path, {"broken": broken}, "broken")
    out = run_hotmodel("serve", "--config", str(config))
    assert out.returncode == 3, out.stderr  # a config error: file, section, key
    assert f"[broken] model: {broken} is not a GGUF file" in out.stderr
    assert not (tmp_path / "state" / "llama-server.log").exists()  # nothing was spawned


@pytest.mark.parametrize("kind", ["truncated", "dup_tokens"])
def test_broken_default_model_fails_start_with_log_tail(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path, kind: str
) -> None:
    broken = _copy(tiny_models[kind], tmp_path / "models")
    config = write_config(tmp_path, {"broken": broken}, "broken")
    out = run_hotmodel("serve", "--config", str(config))
    assert out.returncode == 1, out.stderr
    assert "error: model 'broken' failed to load (exit code" in out.stderr
    assert "--- llama-server log tail ---" in out.stderr
    assert str(broken) in out.stderr or "gguf" in out.stderr.lower()
    _assert_nothing_left(tmp_path)


def test_missing_router_binary_is_a_clear_error(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    config = write_config(
        tmp_path,
        {"tiny": tiny_models["tiny"]},
        "tiny",
        router='llama_server = "/nonexistent/bin/llama-server"',
    )
    out = run_hotmodel("serve", "--config", str(config))
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "error: llama-server not found at /nonexistent/bin/llama-server"
        " (set by [router] llama_server)"
    )


def test_router_binary_that_is_not_on_path(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    config = write_config(
        tmp_path,
        {"tiny": tiny_models["tiny"]},
        "tiny",
        router='llama_server = "no-such-llama-server-binary"',
    )
    out = run_hotmodel("serve", "--config", str(config))
    assert out.returncode == 1
    assert (
        "'no-such-llama-server-binary' ([router] llama_server) is not a file and not on PATH"
        in out.stderr
    )


def test_router_that_exits_at_once_is_reported(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path
) -> None:
    config = write_config(
        tmp_path, {"tiny": tiny_models["tiny"]}, "tiny", router='extra_args = ["--no-such-flag"]'
    )
    out = run_hotmodel("serve", "--config", str(config))
    assert out.returncode == 1
    assert "llama-server exited during start-up with code" in out.stderr
    assert "--no-such-flag" in out.stderr  # quoted from the router's log
    _assert_nothing_left(tmp_path)


def test_broken_config_exits_3_naming_file_section_key(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    config = write_config(
        tmp_path, {"tiny": tiny_models["tiny"]}, "tiny", router='parallel = "two"'
    )
    out = run_hotmodel("serve", "--config", str(config))
    assert out.returncode == 3
    assert (
        out.stderr.strip() == f"error: {config} [router] parallel: expected an integer, got 'two'"
    )


def test_missing_config_file(tmp_path: Path) -> None:
    out = run_hotmodel("serve", "--config", str(tmp_path / "nope.toml"))
    assert out.returncode == 3
    assert out.stderr.strip() == f"error: {tmp_path / 'nope.toml'}: config file not found"


def test_missing_default_model_file(tmp_path: Path, llama_server: Path) -> None:
    config = write_config(tmp_path, {"ghost": tmp_path / "ghost.gguf"}, "ghost")
    out = run_hotmodel("serve", "--config", str(config))
    assert out.returncode == 3
    assert f"[ghost] model: model file not found: {tmp_path / 'ghost.gguf'}" in out.stderr


def test_busy_port_fails_before_spawning_the_router(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = write_config(
            tmp_path, {"tiny": _copy(tiny_models["tiny"], tmp_path / "m")}, "tiny", port=port
        )
        out = run_hotmodel("serve", "--config", str(config))
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert not (tmp_path / "state" / "llama-server.log").exists()


def test_router_crash_with_restarts_off_is_detected_and_reported(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path
) -> None:
    models = tmp_path / "models"
    config = write_config(
        tmp_path,
        {"tiny": _copy(tiny_models["tiny"], models)},
        "tiny",
        router="restart_attempts = 0",
    )
    hp: HotmodelProcess = start_hotmodel(config)
    try:
        router = hp.status()["router"]
        assert isinstance(router, dict)
        psutil.Process(router["pid"]).kill()
        deadline = time.monotonic() + 10
        while httpx.get(hp.base_url + "/health").status_code == 200:
            assert time.monotonic() < deadline, "router exit not noticed"
            time.sleep(0.05)
        health = httpx.get(hp.base_url + "/health")
        assert health.status_code == 503
        assert health.json()["status"] == "router_exited"
        resp = httpx.post(
            hp.base_url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}
        )
        assert resp.status_code == 503
        assert resp.headers["retry-after"]
        err = resp.json()["error"]
        assert err["code"] == "router_unavailable"
        assert "router exited with code -9" in err["message"]
        status = hp.status()
        assert status["router"]["state"] == "exited"  # type: ignore[index]
        assert status["router"]["exit_code"] == -9  # type: ignore[index]
        assert "exited unexpectedly with code -9" in hp.output()
    finally:
        assert hp.stop() == 0, hp.output()
    _assert_nothing_left(tmp_path)
