"""The ``scheduling`` section: closed-loop clients over two models, switch per request
against the scheduler's queues.

Each client loops on its own model (client ``i`` on SmolLM2 when ``i`` is even, Gemma
when odd), one short answer after the other, for a fixed time. Two ways, each on a
``hotmodel serve`` of its own with ``[switch] auto = true``:

- ``per_request``: ``max_wait_seconds = 0`` (a request for the other model is
  switched to at once, as before the scheduler: one switch per request);
- ``scheduler``: the defaults (``linger_seconds``, ``max_wait_seconds``).

Written down: requests served and switches made per minute, and the requests'
latency (p50, p99, longest) for each number of clients.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import Settings, client, serving, summary
from bench.results import n, table

MODELS = ("smollm2", "gemma3")
WAYS = {  # [switch] lines of each way's config
    "per_request": "[switch]\nauto = true\nmax_wait_seconds = 0",
    "scheduler": "[switch]\nauto = true",
}


def _client(base: str, model: str, until: float) -> list[float]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    took: list[float] = []
    with client(300) as c:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            c.post(base + "/v1/chat/completions", json=body).raise_for_status()
            took.append((time.perf_counter() - t0) * 1000)
    return took


def _switches(base: str) -> int:
    """Commands that changed the loaded model so far (``/metrics``: the history of
    ``/admin/switches`` keeps only the last ``[switch] history`` reports)."""
    text = httpx.get(base + "/metrics", timeout=30).text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "hotmodel_switches"
            for sample in family.samples
            if sample.name == "hotmodel_switches_total" and sample.labels["outcome"] == "ok"
        )
    )


def _run(base: str, clients: int, seconds: float) -> dict[str, Any]:
    before = _switches(base)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        runs = list(
            pool.map(
                lambda i: _client(base, MODELS[i % 2], t0 + seconds),
                range(clients),
            )
        )
    wall_min = (time.monotonic() - t0) / 60
    took = [ms for run in runs for ms in run]
    switches = _switches(base) - before
    return {
        "requests": len(took),
        "switches": switches,
        "requests_per_min": round(len(took) / wall_min, 1),
        "switches_per_min": round(switches / wall_min, 1),
        "latency": {**summary(took), "max_ms": round(max(took), 1)},
    }


def measure(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": s.sched_seconds, "ways": {}}
    for way, extra in WAYS.items():
        with serving(extra=extra) as served:
            out["ways"][way] = {
                str(n): _run(served.base_url, n, s.sched_seconds) for n in s.sched_clients
            }
    return out


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    return []  # reported, no target of its own


def markdown(r: dict[str, Any]) -> list[str]:
    rows = []
    for way, levels in r["ways"].items():
        for clients, m in levels.items():
            lat = m["latency"]
            rows.append(
                [
                    way,
                    clients,
                    n(m["requests_per_min"], 1),
                    n(m["switches_per_min"], 1),
                    n(lat["p50_ms"], 0),
                    n(lat["p99_ms"], 0),
                    n(lat["max_ms"], 0),
                ]
            )
    return [
        "### Scheduling: closed-loop clients over two models",
        "",
        f"Each client loops on its own model (SmolLM2 or Gemma, alternately), {r['seconds']:g} s "
        "per row; `per_request`: `max_wait_seconds = 0` (a switch for every request for the "
        "other model, as before the scheduler), `scheduler`: the defaults.",
        "",
        *table(
            ["way", "clients", "requests/min", "switches/min", "p50 ms", "p99 ms", "max ms"],
            rows,
        ),
    ]
