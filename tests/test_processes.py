"""Process trees without a router: session orphans, reused pids, the pid file, a router
that dies with hotmodel, children that ignore SIGTERM (real processes, plain Python
stand-ins)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import psutil
import pytest

from hotmodel.errors import RouterStartError
from hotmodel.router.client import RouterClient
from hotmodel.router.processes import PidFile, Router, terminate_tree, tree, wait_gone
from hotmodel.router.supervisor import RouterState, RouterSupervisor
from tests.fakes import door_config

# A "router" that starts a "model child" and prints its pid, then waits; on SIGTERM it
# stops its child and exits, as llama-server's router does (no stop waits out its deadline).
ROUTER = (
    "import signal, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "def stop(*_):\n"
    "    child.terminate(); child.wait(); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """``pid`` has exited within ``timeout`` s (a zombie has)."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return not wait_gone([proc], timeout)


@pytest.fixture
def reap() -> Iterator[list[psutil.Process]]:
    """Processes a test started: whatever is left of them is killed after it, pass or fail
    (psutil checks the start time: a reused pid is never touched)."""
    started: list[psutil.Process] = []
    yield started
    for process in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _start_router(reap: list[psutil.Process]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ROUTER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    reap.append(psutil.Process(proc.pid))
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    reap.append(psutil.Process(child))
    return proc, child


@pytest.mark.skipif(os.name == "nt", reason="sessions are POSIX; Windows ends every process")
def test_children_of_a_dead_router_are_found_by_its_session_and_stopped(
    reap: list[psutil.Process],
) -> None:
    proc, child = _start_router(reap)
    router = Router.of(proc.pid)
    proc.kill()  # kill -9 of the router: its model child lives on, re-parented
    proc.wait(5)
    assert not _gone(child, 0.2)
    assert [p.pid for p in tree(router)] == [child]
    terminate_tree(router, timeout=2)
    assert _gone(child)


def test_a_reused_pid_is_never_taken_for_the_router() -> None:
    me = Router.of(os.getpid())
    stale = Router(me.pid, me.started - 1000.0, me.name)  # same pid, another start time
    assert all(p.pid != os.getpid() for p in tree(stale))


def test_the_router_this_process_started_is_stopped_after_a_clock_step(
    reap: list[psutil.Process],
) -> None:
    """Found in CI: psutil's wall-clock start time moved (a clock step moves the boot time
    it adds), the stop took the running router for another process and left it holding its
    port. The router this hotmodel started is known by its handle, whatever the clock."""
    proc, child = _start_router(reap)
    router = Router.of(proc.pid)
    stepped = Router(router.pid, router.started + 5.0, router.name, router.handle)
    assert {p.pid for p in tree(stepped)} >= {proc.pid, child}
    terminate_tree(stepped, timeout=2)
    assert _gone(proc.pid) and _gone(child)


def test_pid_file_stops_a_router_left_by_a_dead_hotmodel(
    tmp_path: Path, reap: list[psutil.Process]
) -> None:
    proc, child = _start_router(reap)
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait(5)  # the hotmodel that wrote the file is gone
    pid_file = PidFile(tmp_path / "router.pid")
    router = Router.of(proc.pid)
    pid_file.write(router)
    record = pid_file.read()
    assert record is not None
    pid_file.path.write_text(
        pid_file.path.read_text().replace(
            f'"owner_pid": {os.getpid()}', f'"owner_pid": {owner.pid}'
        )
    )
    assert pid_file.reap_stale(stop_timeout=2) == 2  # the router and its child
    proc.wait(5)
    assert _gone(child)
    assert not pid_file.path.exists()


def test_pid_file_refuses_while_its_hotmodel_still_runs(
    tmp_path: Path, reap: list[psutil.Process]
) -> None:
    proc, child = _start_router(reap)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file = PidFile(tmp_path / "router.pid")
        pid_file.write(Router.of(proc.pid))
        text = pid_file.path.read_text()
        started = psutil.Process(owner.pid).create_time()
        text = text.replace(f'"owner_pid": {os.getpid()}', f'"owner_pid": {owner.pid}')
        text = text.split('"owner_started"')[0] + f'"owner_started": {started}}}'
        pid_file.path.write_text(text)
        with pytest.raises(RouterStartError, match=f"another hotmodel \\(pid {owner.pid}\\)"):
            pid_file.reap_stale(stop_timeout=2)
        assert psutil.pid_exists(proc.pid)  # nothing was touched
    finally:
        owner.kill()
        terminate_tree(Router.of(proc.pid), timeout=2)
        proc.wait(5)
        _gone(child)


def test_garbage_pid_file_is_ignored(tmp_path: Path) -> None:
    pid_file = PidFile(tmp_path / "router.pid")
    pid_file.path.write_text("not json")
    assert pid_file.reap_stale(stop_timeout=1) == 0
    assert not pid_file.path.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_router_dies_with_its_hotmodel(reap: list[psutil.Process]) -> None:
    """kill -9 of hotmodel: the router gets SIGTERM from the kernel (PR_SET_PDEATHSIG)."""
    script = (
        "import sys, time\n"
        "from hotmodel.router.processes import spawn\n"
        "from pathlib import Path\n"
        "p = spawn([sys.executable, '-c', 'import time; time.sleep(60)'], sys.stdout.buffer, "
        "Path('.'))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    hotmodel = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    reap.append(psutil.Process(hotmodel.pid))
    assert hotmodel.stdout is not None
    router = int(hotmodel.stdout.readline())
    reap.append(psutil.Process(router))
    hotmodel.send_signal(signal.SIGKILL)
    hotmodel.wait(5)
    assert _gone(router)


@pytest.mark.skipif(os.name == "nt", reason="sessions are POSIX")
def test_a_reused_pid_that_leads_its_own_session_is_left_alone() -> None:
    """The pid of a dead router, now a live session leader of someone else: its session
    is the newcomer's, not the dead router's."""
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        name = psutil.Process(other.pid).name()
        dead = Router(other.pid, psutil.Process(other.pid).create_time() - 1000.0, name)
        assert tree(dead) == []
    finally:
        other.kill()
        other.wait(5)


def test_terminate_tree_kills_children_that_ignore_sigterm() -> None:
    """A parent that exits on SIGTERM and a child that ignores it: the child must still be
    gone after the deadline (SIGKILL)."""
    script = (
        "import signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert not _gone(child, 0.2)
        terminate_tree(Router.of(parent.pid), timeout=0.3)
        parent.wait(5)
        assert _gone(child)
    finally:
        for pid in (child, parent.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        parent.wait(5)


def test_a_router_is_not_started_on_a_port_another_process_holds(tmp_path: Path) -> None:
    """Found in CI: a router that could not bind its port was reported healthy, as another
    process answered its health check there. Now the start refuses, naming the port,
    before anything is spawned (``restart()`` tries again after its backoff)."""
    config = door_config(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind((config.router.host, 0))
        held.listen()
        port = held.getsockname()[1]

        async def start() -> None:
            async with httpx.AsyncClient() as http:
                client = RouterClient(http, f"http://{config.router.host}:{port}")
                supervisor = RouterSupervisor(config, tmp_path / "no-binary", client, port)
                with pytest.raises(RouterStartError, match=f"port {port} .* in use"):
                    await supervisor.start()
                assert supervisor.state is RouterState.STOPPED and supervisor.pid is None

        asyncio.run(start())


def _stop_adopted(folder: Path, proc: subprocess.Popen[Any], router: Router) -> RouterState:
    """A supervisor's stop of ``proc``, adopted as its running router known by the record
    ``router`` (watched as :meth:`RouterSupervisor.start` watches it); its state after."""
    adopted = cast("subprocess.Popen[bytes]", proc)  # its output is not read here

    async def stop() -> RouterState:
        async with httpx.AsyncClient() as http:
            client = RouterClient(http, "http://127.0.0.1:9")
            supervisor = RouterSupervisor(door_config(folder), folder / "no-binary", client, 9)
            supervisor._proc, supervisor._router = adopted, router
            supervisor._watcher = asyncio.create_task(supervisor._watch(adopted))
            supervisor.state = RouterState.RUNNING
            await supervisor.stop()
            return supervisor.state

    return asyncio.run(stop())


def test_a_router_its_tree_stop_misses_is_killed_by_its_owner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever fools the tree's identity check (a record whose start time no longer
    matches), the stop of a router this hotmodel started leaves it running for no one:
    its watcher has not seen it exit, so it is killed through its own process handle."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    found = Router.of(proc.pid)
    try:
        stale = Router(found.pid, found.started + 100.0, found.name)
        assert _stop_adopted(tmp_path, proc, stale) is RouterState.STOPPED
        assert proc.returncode is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "outlived its stop; killing it" in caplog.text


def test_a_router_that_stops_is_not_killed_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, reap: list[psutil.Process]
) -> None:
    """The usual stop: the tree's stop ends the router, its watcher sees the exit, and
    nothing is killed after it (no warning: a reaped pid may already be another's)."""
    proc, child = _start_router(reap)
    assert _stop_adopted(tmp_path, proc, Router.of(proc.pid)) is RouterState.STOPPED
    assert proc.returncode == 0 and _gone(child)  # it exited on SIGTERM, in order
    assert "outlived" not in caplog.text
