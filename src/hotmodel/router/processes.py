"""Process trees, portably: spawn the router so it dies with hotmodel, stop or kill a whole
tree, and find a router that an earlier hotmodel left behind (a pid file checked with
psutil, so a reused pid is never killed).

Where each guarantee comes from:

- Linux: the router is spawned with ``PR_SET_PDEATHSIG`` = SIGTERM, so even a
  ``kill -9`` of hotmodel makes the router stop itself and its model children.
- POSIX: the router leads a session of its own (``start_new_session``); its
  children stay in that session even when the router dies first and they are
  re-parented, so a tree is found by session id as well as by parentage.
- Everywhere: a pid file (``<state_dir>/router.pid``) records the router's pid
  and start time and hotmodel's own; the next ``hotmodel serve`` on the same
  state dir stops a router whose pid *and* start time still match.
- Windows: the router is put in a job object with "kill on job close"; the
  job's handle lives as long as hotmodel, so when hotmodel dies, however, the
  system ends the router and its children. terminate() is a hard kill there,
  so a stop ends every process of the tree directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from hotmodel.errors import RouterStartError

log = logging.getLogger("hotmodel.router")

# After SIGKILL, how long to wait for the kernel to reap the processes.
KILL_WAIT_S = 5.0
# How often a stop looks whether the processes it ended are gone.
_GONE_POLL_S = 0.02
# A start time psutil gives in wall-clock seconds is the boot time (whole seconds, in
# /proc/stat) plus the ticks since boot: a clock step or NTP correction moves it, by a
# second or more (CI once saw it: a stop found no router, and the old one kept the port).
# A record read back from a file can only be checked against that, with this slack; the
# router this process started is known by its psutil handle, which is not fooled.
_START_TIME_SLACK_S = 3.0
_PR_SET_PDEATHSIG = 1


def _pdeathsig_setter() -> Callable[[], None] | None:
    """A function that, run in the child before exec, asks Linux for SIGTERM when the
    parent dies. Resolved here, before any fork: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return set_pdeathsig


_SET_PDEATHSIG = _pdeathsig_setter()


_JOB: int | None = None  # Windows: the job object every router is assigned to


def _tie_to_this_process(proc: subprocess.Popen[bytes]) -> None:
    """Windows: make the router die with hotmodel (a kill-on-close job object)."""
    global _JOB
    if sys.platform != "win32":
        return
    import ctypes.wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle, dword = ctypes.wintypes.HANDLE, ctypes.wintypes.DWORD
    kernel32.CreateJobObjectW.restype = handle  # a 64-bit handle, not the default int
    kernel32.CreateJobObjectW.argtypes = [ctypes.c_void_p, ctypes.c_wchar_p]
    kernel32.SetInformationJobObject.argtypes = [handle, ctypes.c_int, ctypes.c_void_p, dword]
    kernel32.AssignProcessToJobObject.argtypes = [handle, handle]

    class _Limits(ctypes.Structure):
        _fields_ = [
            ("PerProcessUserTimeLimit", ctypes.c_int64),
            ("PerJobUserTimeLimit", ctypes.c_int64),
            ("LimitFlags", ctypes.wintypes.DWORD),
            ("MinimumWorkingSetSize", ctypes.c_size_t),
            ("MaximumWorkingSetSize", ctypes.c_size_t),
            ("ActiveProcessLimit", ctypes.wintypes.DWORD),
            ("Affinity", ctypes.c_size_t),
            ("PriorityClass", ctypes.wintypes.DWORD),
            ("SchedulingClass", ctypes.wintypes.DWORD),
        ]

    class _Counters(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("r", "w", "o", "rb", "wb", "ob")]

    class _Extended(ctypes.Structure):
        _fields_ = [
            ("BasicLimitInformation", _Limits),
            ("IoInfo", _Counters),
            ("ProcessMemoryLimit", ctypes.c_size_t),
            ("JobMemoryLimit", ctypes.c_size_t),
            ("PeakProcessMemoryUsed", ctypes.c_size_t),
            ("PeakJobMemoryUsed", ctypes.c_size_t),
        ]

    kill_on_job_close, extended_limit_information = 0x2000, 9
    try:
        if _JOB is None:
            job = kernel32.CreateJobObjectW(None, None)
            info = _Extended()
            info.BasicLimitInformation.LimitFlags = kill_on_job_close
            if not job or not kernel32.SetInformationJobObject(
                job, extended_limit_information, ctypes.byref(info), ctypes.sizeof(info)
            ):
                raise OSError(ctypes.get_last_error(), "job object")
            _JOB = job
        if not kernel32.AssignProcessToJobObject(_JOB, int(proc._handle)):  # type: ignore[attr-defined,unused-ignore]
            raise OSError(ctypes.get_last_error(), "AssignProcessToJobObject")
    except OSError as exc:  # the pid file still lets the next start clean up
        log.warning("could not tie the router to hotmodel's life (job object): %s", exc)


def spawn(
    argv: list[str], log_file: IO[bytes] | None, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start the router (or, for the cluster demo, a node) in its own session / process
    group, tied to this process's life; its output to ``log_file`` (None: ours).

    Its own group means a terminal's Ctrl-C reaches hotmodel only, which then
    stops the router in order. Popen returns at once (fork/exec), so calling it
    from async code is fine.
    """
    extra: dict[str, Any]
    if sys.platform == "win32":
        extra = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    else:
        extra = {"start_new_session": True}
        if _SET_PDEATHSIG is not None:
            extra["preexec_fn"] = _SET_PDEATHSIG
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=None if log_file is None else subprocess.STDOUT,
        cwd=cwd,
        env=None if env is None else dict(env),
        **extra,
    )
    _tie_to_this_process(proc)
    return proc


@dataclass(frozen=True, slots=True)
class Router:
    """A router process as it was started: pid, start time and program name identify it
    (and its children) even after it died and its pid may have been reused."""

    pid: int
    started: float
    name: str
    # the process itself, for the hotmodel that started it: psutil knows it by its start
    # in ticks since boot (Linux, macOS), which no clock change moves
    handle: psutil.Process | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, pid: int) -> Router:
        try:
            proc = psutil.Process(pid)
            return cls(pid, float(proc.create_time()), proc.name(), proc)
        except psutil.Error:
            return cls(pid, 0.0, "")

    def alive(self) -> bool:
        """Whether this very process still runs (not another that got its pid)."""
        if self.handle is not None:
            return self.handle.is_running()
        return _same(self.pid, self.started)


def tree(router: Router) -> list[psutil.Process]:
    """The router (if it is still that process), its descendants, and on POSIX the
    processes of its session: model children whose router died before them."""
    procs: dict[int, psutil.Process] = {}
    same = router.alive()
    if same:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = router.handle or psutil.Process(router.pid)
            procs[router.pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
    # A pid number stays allocated while any process has it as its session id; if it is
    # alive as another process, the session with that id is the newcomer's, not ours.
    if os.name != "nt" and router.name and (same or not psutil.pid_exists(router.pid)):
        for p in psutil.process_iter(["name", "create_time"]):
            with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
                if (
                    p.pid not in procs
                    and p.info["name"] == router.name
                    and p.info["create_time"] >= router.started - _START_TIME_SLACK_S
                    and os.getsid(p.pid) == router.pid
                ):
                    procs[p.pid] = p
    return list(procs.values())


def terminate_tree(router: Router, timeout: float, why: str | None = None) -> None:
    """Terminate the router's tree; kill whatever outlives ``timeout`` (``why``: what the
    log says of it; by default that it outlived the stop deadline)."""
    procs = tree(router)
    if not procs:
        return
    # On POSIX a live router stops its own children on SIGTERM; on Windows
    # terminate() is a hard kill, so the children are asked directly as well;
    # children whose router is already gone are asked directly everywhere.
    root = [p for p in procs if p.pid == router.pid]
    targets = root if root and os.name != "nt" else procs
    for p in targets:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    alive = wait_gone(procs, timeout)
    for p in alive:
        log.warning("process %s %s", p.pid, why or "outlived the stop deadline; killing it")
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    wait_gone(alive, KILL_WAIT_S)


def _running(p: psutil.Process) -> bool:
    """Still running: a zombie has exited (its parent reaps it, or an init that does not
    reap orphans, as in some containers, never does: waiting for it is waiting out the
    deadline for nothing)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s until none of ``procs`` runs (a zombie has exited; a
    reused pid is another process); those still running."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(_GONE_POLL_S)


@dataclass(frozen=True, slots=True)
class PidRecord:
    """Who ran the router: enough to recognise both processes later, and only them."""

    router_pid: int
    router_started: float
    router_name: str
    owner_pid: int
    owner_started: float


def _started(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _same(pid: int, started: float) -> bool:
    now = _started(pid)
    return now is not None and abs(now - started) <= _START_TIME_SLACK_S


class PidFile:
    """``<state_dir>/router.pid``: written after the router starts, removed after it stops."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, router: Router) -> None:
        record = PidRecord(
            router_pid=router.pid,
            router_started=router.started,
            router_name=router.name,
            owner_pid=os.getpid(),
            owner_started=_started(os.getpid()) or 0.0,
        )
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(record)), encoding="utf-8")
        partial.replace(self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def read(self) -> PidRecord | None:
        try:
            return PidRecord(**json.loads(self.path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None  # absent or unreadable: nothing can be recognised from it

    def reap_stale(self, stop_timeout: float) -> int:
        """Stop a router (and its model children) left behind by an earlier hotmodel
        on this state dir; returns how many processes it stopped.

        Refuses (RouterStartError) when the hotmodel that wrote the file still runs.
        """
        record = self.read()
        if record is None:
            self.remove()
            return 0
        if record.owner_pid != os.getpid() and _same(record.owner_pid, record.owner_started):
            raise RouterStartError(
                f"another hotmodel (pid {record.owner_pid}) is running with this state dir "
                f"({self.path.parent}); stop it first or give this one another [server] state_dir"
            )
        router = Router(record.router_pid, record.router_started, record.router_name)
        left = tree(router)
        if left:
            log.warning(
                "stopping %d llama-server process(es) left behind by an earlier hotmodel "
                "(pid %s; router pid %s)",
                len(left),
                record.owner_pid,
                record.router_pid,
            )
            terminate_tree(router, stop_timeout)
        self.remove()
        return len(left)
