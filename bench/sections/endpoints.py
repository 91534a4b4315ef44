"""The ``endpoints`` section: each inference endpoint, three paths.

For every endpoint the demo models serve (chat, ``/v1/completions``,
``/completion``, Anthropic's ``/v1/messages``, OpenAI's ``/v1/responses``,
``/v1/embeddings`` on the demo's resident ``smollm2-embed``, ``/tokenize``,
``/detokenize``, ``/apply-template``), a small request (a 2-token answer, or a
4-token stream with ``ignore_eos``; temperature 0, a fixed seed) on the model's own
llama-server process, on the router hotmodel runs (asked directly) and through
hotmodel. One ``hotmodel serve`` of its own, with the demo's resident embedding model
loaded beside SmolLM2. Round-robin: in each round every endpoint is asked once on
each path, the paths in a rotating order, so that drift of the machine hits all
three alike.

Written down: p50 and p99 of each endpoint's wall time (a stream's to its last
byte, and its first byte apart) on each path, and what hotmodel adds over the
router and over the child. No target: the issue asks for the figures.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from bench.harness import (
    PATHS,
    RETRIES,
    Paths,
    Settings,
    clients,
    find_paths,
    rotate,
    say,
    serving,
    summary,
)
from bench.results import n, table

CHAT = "smollm2"
EMBED = "smollm2-embed"  # the demo's resident embedding model (configs/demo.ini)
MESSAGES = [{"role": "user", "content": "Hi"}]
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 1}
STREAM: dict[str, Any] = {"stream": True, "ignore_eos": True}
ANSWER_TOKENS = 2
STREAM_TOKENS = 4


@dataclass(frozen=True)
class Probe:
    """One request of the section: an endpoint, its body, plain or streamed."""

    name: str  # the row's label
    path: str
    body: dict[str, Any]
    model: str = CHAT
    stream: bool = False

    def payload(self) -> dict[str, Any]:
        return {"model": self.model, **self.body, **(STREAM if self.stream else {})}


def probes(tokens: list[int]) -> list[Probe]:
    """Every endpoint, plain and (where it streams) streamed; ``tokens`` for /detokenize."""
    chat = {"messages": MESSAGES, **GREEDY}
    completion = {"prompt": "Hi", **GREEDY}
    generating = [
        ("chat", "/v1/chat/completions", chat, "max_tokens"),
        ("/v1/completions", "/v1/completions", completion, "max_tokens"),
        ("/completion", "/completion", completion, "n_predict"),
        ("/v1/messages", "/v1/messages", {"messages": MESSAGES, "temperature": 0}, "max_tokens"),
        ("/v1/responses", "/v1/responses", {"input": "Hi", **GREEDY}, "max_output_tokens"),
    ]
    out = []
    for name, path, body, bound in generating:
        out.append(Probe(name, path, {**body, bound: ANSWER_TOKENS}))
        out.append(Probe(f"{name}, stream", path, {**body, bound: STREAM_TOKENS}, stream=True))
    return [
        *out,
        Probe("/v1/embeddings", "/v1/embeddings", {"input": "Hi"}, model=EMBED),
        Probe("/tokenize", "/tokenize", {"content": "Hello world"}),
        Probe("/detokenize", "/detokenize", {"tokens": tokens}),
        Probe("/apply-template", "/apply-template", {"messages": MESSAGES}),
    ]


def _plain(c: httpx.Client, url: str, probe: Probe) -> float:
    t0 = time.perf_counter()
    r = c.post(url + probe.path, json=probe.payload())
    took = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{probe.name} at {url}: {r.status_code} {r.text[:300]}")
    return took


def _streamed(c: httpx.Client, url: str, probe: Probe) -> tuple[float, float]:
    """Milliseconds to the first byte and to the last of a streamed answer."""
    t0 = time.perf_counter()
    first: float | None = None
    events = 0
    with c.stream("POST", url + probe.path, json=probe.payload()) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{probe.name} at {url}: {r.status_code} {r.read()[:300]!r}")
        for chunk in r.iter_raw():
            first = (time.perf_counter() - t0) * 1000 if first is None else first
            events += chunk.count(b"data: ")
    if first is None or events < 2:
        raise RuntimeError(f"{probe.name} at {url}: a stream of {events} event(s)")
    return first, (time.perf_counter() - t0) * 1000


def _loaded_paths(base: str, model: str, deadline_s: float = 120) -> Paths:
    """``find_paths`` for ``model``, once it is loaded (a resident loads after start)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return find_paths(base, model)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def _three_clients(auth: dict[str, str]) -> Iterator[dict[str, httpx.Client]]:
    with contextlib.ExitStack() as stack:
        yield {p: stack.enter_context(c) for p, c in zip(PATHS, clients(auth=auth), strict=True)}


def measure(s: Settings) -> dict[str, Any]:
    """``s.endpoint_rounds`` rounds of every probe on the three paths."""
    total: dict[str, dict[str, list[float]]] = {}
    first: dict[str, dict[str, list[float]]] = {}
    RETRIES.clear()
    with serving(residents=True) as served:
        chat_paths = _loaded_paths(served.base_url, CHAT)
        embed_paths = _loaded_paths(served.base_url, EMBED)
        with _three_clients(chat_paths.auth) as client:
            said = client["child"].post(
                chat_paths.child + "/tokenize", json={"content": "Hello world"}
            )
            said.raise_for_status()
            tokens = [int(t) for t in said.json()["tokens"]]
            every = probes(tokens)
            total = {p.name: {path: [] for path in PATHS} for p in every}
            first = {p.name: {path: [] for path in PATHS} for p in every if p.stream}

            def url(probe: Probe, path: str) -> str:
                return (embed_paths if probe.model == EMBED else chat_paths).url(path)

            def once(probe: Probe, path: str) -> tuple[float, float | None]:
                if probe.stream:
                    head, whole = _streamed(client[path], url(probe, path), probe)
                    return whole, head
                return _plain(client[path], url(probe, path), probe), None

            for _ in range(3):  # warm every path, its connections and the prompt cache
                for probe in every:
                    for path in PATHS:
                        once(probe, path)
            say(f"endpoints: {len(every)} requests x 3 paths x {s.endpoint_rounds} rounds")
            for i in range(s.endpoint_rounds):
                for j, probe in enumerate(every):
                    for path in rotate(PATHS, i + j):
                        whole, head = once(probe, path)
                        total[probe.name][path].append(whole)
                        if head is not None:
                            first[probe.name][path].append(head)
        origins = {chat_paths.url(p) for p in PATHS} | {embed_paths.child}
    return {
        "rounds": s.endpoint_rounds,
        "answer_tokens": ANSWER_TOKENS,
        "stream_tokens": STREAM_TOKENS,
        "endpoints": {probe.name: _figures(probe, total, first) for probe in every},
        "retries_on_closed_keepalive": {o: RETRIES[o] for o in sorted(origins) if RETRIES[o]},
    }


def _figures(
    probe: Probe, total: dict[str, dict[str, list[float]]], first: dict[str, dict[str, list[float]]]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": probe.path,
        "model": probe.model,
        "stream": probe.stream,
        "paths": {p: summary(total[probe.name][p]) for p in PATHS},
    }
    if probe.stream:
        out["first_byte"] = {p: summary(first[probe.name][p]) for p in PATHS}
    return out


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    return []  # the issue asks for the figures, not a bound


def _row(label: str, figures: dict[str, dict[str, float]]) -> list[str]:
    p50 = [float(figures[p]["p50_ms"]) for p in PATHS]
    p99 = [float(figures[p]["p99_ms"]) for p in PATHS]
    return [
        label,
        *(n(v) for v in p50),
        f"{p50[2] - p50[1]:+.2f}",
        f"{p50[2] - p50[0]:+.2f}",
        *(n(v) for v in p99),
        f"{p99[2] - p99[1]:+.2f}",
    ]


def markdown(r: dict[str, Any]) -> list[str]:
    rows = []
    for name, e in r["endpoints"].items():
        rows.append(_row(name + (" (whole)" if e["stream"] else ""), e["paths"]))
        if e["stream"]:
            rows.append(_row(f"{name} (first byte)", e["first_byte"]))
    intro = (
        f"{r['rounds']} rounds; in each, every endpoint once on each path, the paths in a "
        f"rotating order; keep-alive client per path. Plain: a {r['answer_tokens']}-token "
        f"answer; stream: {r['stream_tokens']} tokens (`ignore_eos`), timed to its last byte "
        "(whole) and its first; temperature 0, seed 1. `/v1/embeddings` on the resident "
        "`smollm2-embed`, everything else on SmolLM2. ms; *+router*, *+child*: hotmodel's "
        "p50 minus theirs."
    )
    head = [
        "endpoint",
        "child p50",
        "router p50",
        "hotmodel p50",
        "+router",
        "+child",
        "child p99",
        "router p99",
        "hotmodel p99",
        "+router p99",
    ]
    return ["### Endpoints: each one, three paths", "", intro, "", *table(head, rows)]
