"""What the sections of scripts/bench.py share: the settings of a run, the three
paths a request can take (the model's own server, the bare router, hotmodel),
the interleaving order, and a sampler of hotmodel's resident memory."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

import httpx
import psutil

from hotmodel.router.models import ModelState, parse_models
from hotmodel.router.supervisor import backend_key

PATHS = ("child", "router", "hotmodel")
MB = 1024 * 1024

# The same 1-token request on every path (the prompt cache makes it cheap and steady).
PLAIN: dict[str, Any] = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 1,
    "temperature": 0,
}


def stream_body(tokens: int) -> dict[str, Any]:
    """A stream of a fixed length: ``tokens`` tokens whatever the model would say."""
    return {**PLAIN, "max_tokens": tokens, "ignore_eos": True}


@dataclass(frozen=True)
class Settings:
    """How much each section measures; ``full()`` for the report, ``smoke()`` for the test."""

    proxy_rounds: int
    stream_tokens: int
    throughput_clients: tuple[int, ...]
    throughput_seconds: float  # per path and client count, split into blocks
    throughput_blocks: int
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

    @classmethod
    def full(cls) -> Settings:
        return cls(
            proxy_rounds=200,
            stream_tokens=32,
            throughput_clients=(8, 64),
            throughput_seconds=10.0,
            throughput_blocks=5,
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
            throughput_clients=(2, 4),
            throughput_seconds=1.0,
            throughput_blocks=2,
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
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


class _RetryStale(httpx.HTTPTransport):
    """Sends a request again, once, when a kept-alive connection turns out closed.

    llama-server closes idle kept-alive connections on its own schedule; a request that
    races that close fails with "Server disconnected without sending a response" before
    the server read it, so sending it again is safe (hotmodel's own ``router.client.send``
    does the same). Without this, a bench against the bare router fails now and then.
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.RemoteProtocolError as exc:
            if "without sending a response" not in str(exc):
                raise
            return super().handle_request(request)


def client(timeout: float = 120, auth: dict[str, str] | None = None) -> httpx.Client:
    """A keep-alive client for the benches (no proxies from the environment)."""
    return httpx.Client(timeout=timeout, trust_env=False, headers=auth, transport=_RetryStale())


def clients(
    n: int = len(PATHS), timeout: float = 120, auth: dict[str, str] | None = None
) -> list[httpx.Client]:
    """One keep-alive client per path, each sending ``auth`` (``Paths.auth``)."""
    return [client(timeout, auth) for _ in range(n)]


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


def gaps(times: list[float]) -> Iterator[float]:
    """The gaps between consecutive arrival times."""
    for a, b in itertools.pairwise(times):
        yield b - a
