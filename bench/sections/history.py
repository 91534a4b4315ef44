"""The ``history`` section: the time a request spends outside the model, without a
session on each path and with hotmodel sessions of N stored messages (written straight
into its store: SQLite WAL takes a second writer), and hotmodel's own share of each
(its ``Server-Timing`` header)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import PATHS, PLAIN, Paths, Settings, clients, rotate, summary
from bench.results import cell, n, table, target
from hotmodel.sessions.sqlite import SqliteStore


async def fill(store_file: Path, sizes: tuple[int, ...]) -> None:
    """Sessions ``h<n>`` of ``n`` stored messages each, written straight into the store."""
    async with SqliteStore(store_file) as store:
        for size in sizes:
            if size:
                history = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
                    for i in range(size)
                ]
                await store.append("", f"h{size}", history, "smollm2", "")


def own_ms(server_timing: str | None) -> float | None:
    """hotmodel's own time from its ``Server-Timing`` header (``hotmodel;dur=MS, ...``)."""
    for part in (server_timing or "").split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name == "hotmodel" and duration:
            return float(duration)
    return None


def timed_turn(c: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, float | None]:
    """One chat request: its wall time minus llama-server's own prompt + predict time,
    and hotmodel's own time as its ``Server-Timing`` header says (None elsewhere)."""
    t0 = time.perf_counter()
    answer = c.post(url + "/v1/chat/completions", json=body)
    wall = (time.perf_counter() - t0) * 1000
    answer.raise_for_status()
    timings = answer.json()["timings"]
    outside = float(wall - timings["prompt_ms"] - timings["predicted_ms"])
    return outside, own_ms(answer.headers.get("server-timing"))


def measure(paths: Paths, store_file: Path, s: Settings) -> dict[str, Any]:
    """Time outside the model: wall time minus llama-server's prompt + predict time, for
    requests without a session on each path and for hotmodel sessions of N stored messages;
    and hotmodel's own share of each (its ``Server-Timing`` header)."""
    asyncio.run(fill(store_file, s.history_sizes))
    names = (*PATHS, *(f"h{size}" for size in s.history_sizes))
    out: dict[str, list[float]] = {name: [] for name in names}
    own: dict[str, list[float]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        client = {
            name: stack.enter_context(c)
            for name, c in zip(names, clients(len(names), auth=paths.auth), strict=True)
        }
        for r in range(s.history_rounds + 1):
            for name in rotate(names, r):
                if name in PATHS:
                    url, body = paths.url(name), PLAIN
                else:
                    turn = {"role": "user", "content": f"turn {r}"}
                    url, body = paths.hotmodel, {**PLAIN, "messages": [turn], "session_id": name}
                outside, hotmodel_ms = timed_turn(client[name], url, body)
                if r:  # the first round warms connections and prompt caches
                    out[name].append(outside)
                    if hotmodel_ms is not None:
                        own[name].append(hotmodel_ms)
    return {
        "rounds": s.history_rounds,
        "no_session": {p: summary(out[p]) for p in PATHS},
        "stored_messages": {str(size): summary(out[f"h{size}"]) for size in s.history_sizes},
        "hotmodel_own": {
            "no_session": summary(own["hotmodel"]),
            **{str(size): summary(own[f"h{size}"]) for size in s.history_sizes},
        },
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """On hotmodel's own time (Server-Timing): the time outside the model also holds
    llama-server's work on the longer prompt a session sends, which is not hotmodel's."""
    own = r["hotmodel_own"]
    largest = max(r["stored_messages"], key=int)
    measured = own[largest]["p50_ms"] - own["no_session"]["p50_ms"]
    figure = f"history: {int(largest):,} stored messages, hotmodel's own time over no session"
    return [target(figure, measured, 2.0, "≤ +2 ms")]


def markdown(r: dict[str, Any]) -> list[str]:
    base, own = r["no_session"], r["hotmodel_own"]
    rows = [
        [
            "no session",
            *(n(base[p]["p50_ms"]) for p in PATHS),
            n(own["no_session"]["p50_ms"]),
            "-",
            "-",
        ]
    ]
    [check] = targets(r)
    largest = max(r["stored_messages"], key=int)
    for size, v in r["stored_messages"].items():
        diff = f"{own[size]['p50_ms'] - own['no_session']['p50_ms']:+.2f}"
        rows.append(
            [
                f"session, {int(size):,} stored",
                "-",
                "-",
                n(v["p50_ms"]),
                n(own[size]["p50_ms"]),
                diff,
                cell(check) if size == largest else "-",
            ]
        )
    intro = (
        f"p50 of {r['rounds']} 1-token turns, every request in turn; sessions written straight "
        "into the store. *Outside the model*: wall time minus llama-server's own "
        "`prompt_ms + predicted_ms`; it also holds llama-server's own work on the longer "
        "prompt a session sends (its template and tokenizer), which grows with the messages "
        "sent. *hotmodel's own*: its `Server-Timing` header, the request's time in hotmodel "
        "apart from the upstream call: session read, prompt building, store write."
    )
    head = [
        "request",
        "child, outside the model",
        "router, outside the model",
        "hotmodel, outside the model",
        "hotmodel's own",
        "own - no session",
        "target",
    ]
    return [
        "### Time outside the model against stored history, ms",
        "",
        intro,
        "",
        *table(head, rows),
    ]
