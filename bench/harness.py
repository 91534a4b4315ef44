"""What every benchmark shares: the settings of a run, a demo config in a temporary
folder, a `hotmodel serve` child process that is healthy before use and stopped after,
a bare llama-server router beside it, the three paths a request can take (the model's
own server, the bare router, hotmodel), the one HTTP client, percentiles, a sampler of
hotmodel's resident memory, and a description of the machine."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil

from hotmodel.config import load_config
from hotmodel.presets import Presets, load_presets
from hotmodel.router import provision
from hotmodel.router.models import ModelState, parse_models
from hotmodel.router.supervisor import backend_key, free_port, router_argv

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("child", "router", "hotmodel")
MB = 1024 * 1024
OTHER = {"smollm2": "gemma3", "gemma3": "smollm2"}

# The same 1-token request on every path (the prompt cache makes it cheap and steady).
PLAIN: dict[str, Any] = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 1,
    "temperature": 0,
}


def say(text: str) -> None:
    """Progress, on stderr (stdout carries the tables)."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def stream_body(tokens: int) -> dict[str, Any]:
    """A stream of a fixed length: ``tokens`` tokens whatever the model would say."""
    return {**PLAIN, "max_tokens": tokens, "ignore_eos": True}


@dataclass(frozen=True)
class Settings:
    """How much each section measures; ``full()`` for the report, ``smoke()`` for the test."""

    proxy_rounds: int
    stream_tokens: int
    endpoint_rounds: int  # every inference endpoint on the three paths
    throughput_clients: tuple[int, ...]
    throughput_seconds: float  # per path and client count, split into blocks
    throughput_blocks: int
    # fresh connections: clients opening a new connection per request, requests per
    # burst, bursts per path (interleaved)
    burst_clients: int
    burst_requests: int
    burst_rounds: int
    switch_rounds: int  # round trips smollm2 -> gemma3 -> smollm2
    kv_items: int  # facts in the switch-back session (~9 tokens each)
    kv_rounds: int
    history_sizes: tuple[int, ...]
    history_rounds: int
    cache_turns: int
    cache_max_messages: int
    rss_seconds: float
    rss_clients: int
    sched_clients: tuple[int, ...]  # closed-loop clients over two models
    sched_seconds: float  # per way and client count
    # two nodes on one PostgreSQL: rounds local / forwarded, closed-loop clients and
    # seconds per way (one node, two nodes) and client count
    cluster_rounds: int = 200
    cluster_clients: tuple[int, ...] = (4, 8)
    cluster_seconds: float = 10.0

    @classmethod
    def full(cls) -> Settings:
        return cls(
            proxy_rounds=200,
            stream_tokens=32,
            endpoint_rounds=200,
            throughput_clients=(8, 64),
            throughput_seconds=10.0,
            throughput_blocks=5,
            burst_clients=64,
            burst_requests=256,
            burst_rounds=5,
            switch_rounds=5,
            kv_items=290,
            kv_rounds=2,
            history_sizes=(0, 10, 1000, 10000),
            history_rounds=20,
            cache_turns=100,
            cache_max_messages=64,
            rss_seconds=5.0,
            rss_clients=64,
            sched_clients=(2, 4),
            sched_seconds=30.0,
        )

    @classmethod
    def smoke(cls) -> Settings:
        return cls(
            proxy_rounds=3,
            stream_tokens=8,
            endpoint_rounds=2,
            throughput_clients=(2, 4),
            throughput_seconds=1.0,
            throughput_blocks=2,
            burst_clients=4,
            burst_requests=8,
            burst_rounds=1,
            switch_rounds=1,
            kv_items=20,
            kv_rounds=1,
            history_sizes=(0, 10),
            history_rounds=3,
            cache_turns=6,
            cache_max_messages=4,
            rss_seconds=1.0,
            rss_clients=4,
            sched_clients=(2,),
            sched_seconds=3.0,
            cluster_rounds=3,
            cluster_clients=(2,),
            cluster_seconds=1.0,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- the one HTTP client ---------------------------------------------------------------

RETRIES: Counter[str] = Counter()  # retries on a closed kept-alive connection, per origin


class _RetryStale(httpx.HTTPTransport):
    """Sends a request again, once, when a kept-alive connection turns out closed.

    llama-server closes idle kept-alive connections on its own schedule; a request that
    races that close fails with "Server disconnected without sending a response" before
    the server read it, so sending it again is safe (hotmodel's own ``router.client.send``
    does the same). Without this, a bench against the bare router fails now and then.
    Each retry is counted in ``RETRIES`` under the request's origin.
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.RemoteProtocolError as exc:
            if "without sending a response" not in str(exc):
                raise
            url = request.url
            RETRIES[f"{url.scheme}://{url.host}:{url.port}"] += 1
            return super().handle_request(request)


def client(timeout: float = 120, auth: dict[str, str] | None = None) -> httpx.Client:
    """A keep-alive client for the benches (no proxies from the environment)."""
    return httpx.Client(timeout=timeout, trust_env=False, headers=auth, transport=_RetryStale())


def clients(
    n: int = len(PATHS), timeout: float = 120, auth: dict[str, str] | None = None
) -> list[httpx.Client]:
    """One keep-alive client per path, each sending ``auth`` (``Paths.auth``)."""
    return [client(timeout, auth) for _ in range(n)]


# --- hotmodel serve on the demo models ---------------------------------------------------


@dataclass(frozen=True)
class Served:
    config: Path
    base_url: str
    pid: int  # the hotmodel process (not its llama-server children)

    @property
    def store(self) -> Path:
        """Its session store."""
        return self.config.parent / "state" / "sessions.sqlite3"


def demo_presets() -> Presets:
    """The demo's presets (configs/demo.ini, paths resolved), so that a benchmark loads its
    models the way the demo does."""
    return load_presets(ROOT / "configs" / "demo.ini")


def demo_globals() -> dict[str, str]:
    """The demo presets' shared ``[*]`` options."""
    return dict(demo_presets().globals)


def write_demo_config(
    folder: Path,
    default: str = "smollm2",
    extra: str = "",
    shared: dict[str, str] | None = None,
    residents: bool = False,
) -> Path:
    """hotmodel.toml + models.ini for the two cached demo models, on a free port, with the
    demo presets' options; the ``[*]`` ones are replaced by ``shared`` when given. With
    ``residents``, the demo's resident presets too (``smollm2-embed``: the SmolLM2 file
    as an embedding model, kept loaded beside the switched one)."""
    demo = demo_presets()
    options = dict(demo.globals) if shared is None else shared
    shared_ini = "".join(f"{k} = {v}\n" for k, v in options.items())
    entries = ""
    for m in provision.DEMO_MODELS:
        own = demo.models[m.key].options if m.key in demo.models else {}
        rest = "".join(f"{k} = {v}\n" for k, v in own.items() if k not in ("model", "m"))
        entries += f"[{m.key}]\nmodel = {provision.model_cache_path(m)}\n{rest}"
    for name in demo.residents if residents else ():
        own = demo.models[name].options  # its model path resolved (the cached demo file)
        entries += f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in own.items())
        entries += "resident = true\n"
    (folder / "models.ini").write_text(f"version = 1\n[*]\n{shared_ini}{entries}")
    path = folder / "hotmodel.toml"
    path.write_text(
        f'[server]\nport = {free_port("127.0.0.1")}\nstate_dir = "state"\n'
        f'[router]\nmodels_preset = "models.ini"\ndefault_model = "{default}"\n'
        f"ctx_size = 4096\n{extra}\n"
    )
    return path


def wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(default: str = "smollm2", extra: str = "", residents: bool = False) -> Iterator[Served]:
    """`hotmodel serve` on the demo models (and the demo's residents, with ``residents``)
    in a temporary folder, healthy, stopped after."""
    with tempfile.TemporaryDirectory(prefix="hotmodel-bench-") as tmp:
        config = write_demo_config(Path(tmp), default, extra, residents=residents)
        port = config.read_text().split("port = ", 1)[1].split("\n", 1)[0]
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "hotmodel", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(base, proc, "hotmodel serve")
            yield Served(config, base, proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def hotmodel_switch(c: httpx.Client, base: str, target: str) -> dict[str, Any]:
    """``POST /admin/switch`` to ``target``, timed by the client; the report's phases."""
    t0 = time.perf_counter()
    report = c.post(base + "/admin/switch", json={"model": target}).json()
    t1 = time.perf_counter()
    assert report["outcome"] == "ok", report
    return {
        "to": target,
        "client_ms": (t1 - t0) * 1000,
        "report_total_ms": report["total_ms"],
        "phases": report["phases"],
    }


# --- the bare router: what hotmodel runs, not managed by hotmodel -------------------------


def wait_status(client: httpx.Client, url: str, model: str, want: str) -> None:
    """Poll the router's GET /models every 5 ms until ``model`` reads ``want``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for m in client.get(url + "/models").json()["data"]:
            if m["id"] == model and m["status"]["value"] == want:
                return
        time.sleep(0.005)
    raise TimeoutError(f"{model} never reached {want}")


@contextlib.contextmanager
def bare_router(config_path: Path | None = None, model: str = "smollm2") -> Iterator[str]:
    """A llama-server router with the arguments hotmodel would use for ``config_path`` (the
    demo config in a temporary folder when None), not managed by hotmodel, with ``model``
    loaded; yields its URL and stops it after."""
    with contextlib.ExitStack() as stack:
        if config_path is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="hotmodel-bench-"))
            config_path = write_demo_config(Path(folder))
        config = load_config(config_path)
        port = free_port("127.0.0.1")
        state = config.server.state_dir
        state.mkdir(parents=True, exist_ok=True)
        presets = state / "bench-presets.ini"
        presets.write_text(config.presets.render())
        argv = router_argv(config, provision.find_llama_server(), presets, port)
        url = f"http://127.0.0.1:{port}"
        with (state / "bench-router.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, "the bare router")
            with client(30) as c:
                c.post(url + "/models/load", json={"model": model})
                wait_status(c, url, model, "loaded")
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def bare_switch(c: httpx.Client, url: str, current: str, target: str) -> dict[str, Any]:
    """The router's own unload of ``current`` + load of ``target``, timed."""
    t0 = time.perf_counter()
    c.post(url + "/models/unload", json={"model": current})
    wait_status(c, url, current, "unloaded")
    t1 = time.perf_counter()
    c.post(url + "/models/load", json={"model": target})
    wait_status(c, url, target, "loaded")
    t2 = time.perf_counter()
    return {
        "to": target,
        "unload_ms": (t1 - t0) * 1000,
        "load_ms": (t2 - t1) * 1000,
        "total_ms": (t2 - t0) * 1000,
    }


# --- the three paths ---------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Base URLs of the three ways to the loaded model."""

    child: str  # the loaded model's own llama-server process
    router: str  # the router hotmodel runs, asked directly
    hotmodel: str
    # llama-server answers only hotmodel's key (read from the router's environment:
    # this benchmark runs as the same user); hotmodel without keys ignores the header
    auth: dict[str, str] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return str(getattr(self, name))


def find_paths(base: str, model: str = "smollm2") -> Paths:
    """The router's URL from hotmodel's ``/admin/status``, and the port of ``model``'s
    own process from the router's ``GET /models`` (its ``status.args``)."""
    with client(10) as c:
        info = c.get(base + "/admin/status").json()["router"]
        router, auth = str(info["url"]), router_auth(int(info["pid"]))
        status = parse_models(c.get(router + "/models", headers=auth).json()).get(model)
    if status is None or status.state is not ModelState.LOADED or status.port is None:
        raise RuntimeError(f"{model} is not loaded on the router at {router}: {status}")
    host = router.rsplit(":", 1)[0]
    return Paths(child=f"{host}:{status.port}", router=router, hotmodel=base, auth=auth)


def router_auth(router_pid: int) -> dict[str, str]:
    """The header hotmodel's llama-server demands (its key, from the router's environment)."""
    key = backend_key(router_pid)
    return {} if key is None else {"authorization": f"Bearer {key}"}


def rotate(names: tuple[str, ...], i: int) -> tuple[str, ...]:
    """``names`` starting at the ``i``-th: round ``i`` of an interleaved measurement, so
    that no path is always first (or always right after another)."""
    k = i % len(names)
    return names[k:] + names[:k]


def gaps(times: list[float]) -> Iterator[float]:
    """The gaps between consecutive arrival times."""
    for a, b in itertools.pairwise(times):
        yield b - a


# --- statistics --------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def p50(values: list[float]) -> float:
    """The median, to 0.1."""
    return round(statistics.median(values), 1)


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(pct(ms, 0.9), 3),
        "p99_ms": round(pct(ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "n": len(ms),
    }


# --- hotmodel's memory -------------------------------------------------------------------


class RssSampler:
    """Samples one process's resident memory (not its children's) every 20 ms, in a thread."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        rss = int(self.process.memory_info().rss)
        self.peak = max(self.peak, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.now()
            except psutil.Error:
                return

    def __enter__(self) -> RssSampler:
        self.now()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)


def idle_rss_mb(sampler: RssSampler, settle_s: float = 1.0) -> float:
    """Resident memory after ``settle_s`` without requests: the median of five readings."""
    time.sleep(settle_s)
    readings = []
    for _ in range(5):
        readings.append(sampler.now())
        time.sleep(0.05)
    return round(sorted(readings)[2] / MB, 1)


# --- the machine -------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "gpus": _gpus(),
    }


def llama_cpp() -> dict[str, Any]:
    """The llama-server in use: the pinned llama.cpp build, or another one (PATH), and what
    the binary says of itself."""
    binary = provision.find_llama_server()
    try:
        said = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30
        )
        version = (said.stdout + said.stderr).strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        version = []
    pinned = binary.resolve() == provision.cached_llama_server().resolve()
    return {
        "version": (
            f"{provision.LLAMA_CPP_PACKAGE}=={provision.LLAMA_CPP_VERSION}"
            if pinned
            else f"llama-server at {binary}"
        ),
        "pinned_build": pinned,
        "binary": str(binary),
        "binary_version": [line for line in version if line.startswith(("version", "built"))],
    }
