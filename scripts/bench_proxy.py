#!/usr/bin/env python3
"""Measure what hotmodel adds: start-up time and per-request proxy overhead.

    .venv/bin/python scripts/bench_proxy.py [--rounds 150] [--model smollm2]

Starts `hotmodel serve` on the real demo models (cached by `hotmodel setup`),
then sends the same 1-token chat request alternately straight to the router
and through hotmodel (keep-alive clients on both sides), plain and streamed,
and reports p50/p90/mean latency of each and their difference. Numbers go to
stdout as a Markdown table and to bench-results/proxy-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx
from bench_common import client as bench_client
from bench_common import router_auth
from benchlib import ROOT, machine, serving, summary

RETRIES: dict[str, int] = {}


def post_chat(client: httpx.Client, url: str, body: dict[str, Any]) -> httpx.Response:
    """POST a chat request to ``url`` (router, model child or hotmodel)."""
    # The router closes some kept-alive connections without notice (see
    # router_client.send); like hotmodel, the direct path retries once.
    try:
        return client.post(url + "/v1/chat/completions", json=body)
    except httpx.RemoteProtocolError:
        RETRIES[url] = RETRIES.get(url, 0) + 1
        return client.post(url + "/v1/chat/completions", json=body)


def plain_ms(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    """Wall milliseconds of one plain (non-streamed) chat request."""
    t0 = time.perf_counter()
    resp = post_chat(client, url, body)
    resp.raise_for_status()
    return (time.perf_counter() - t0) * 1000


def stream_times(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    """One streamed request: milliseconds to its first byte, and to each SSE event.

    Events that arrive in the same read share its arrival time.
    """
    for attempt in (1, 2):
        t0 = time.perf_counter()
        try:
            with client.stream(
                "POST", url + "/v1/chat/completions", json={**body, "stream": True}
            ) as r:
                r.raise_for_status()
                first: float | None = None
                events: list[float] = []
                for chunk in r.iter_raw():
                    now = (time.perf_counter() - t0) * 1000
                    first = now if first is None else first
                    events += [now] * chunk.count(b"data: ")
                assert first is not None
                return first, events
        except httpx.RemoteProtocolError:
            if attempt == 2:
                raise
            RETRIES[url] = RETRIES.get(url, 0) + 1
    raise AssertionError("unreachable")


def stream_first_byte_ms(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    return stream_times(client, url, body)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    args = ap.parse_args()

    t0 = time.perf_counter()
    with serving(default=args.model) as served:
        startup_ms = (time.perf_counter() - t0) * 1000
        base = served.base_url
        info = httpx.get(base + "/admin/status").json()["router"]
        router, auth = info["url"], router_auth(int(info["pid"]))
        body = {
            "model": args.model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
            "temperature": 0,
        }
        results: dict[str, list[float]] = {
            k: []
            for k in (
                "router_plain",
                "hotmodel_plain",
                "router_stream_ttfb",
                "hotmodel_stream_ttfb",
            )
        }
        with (
            bench_client(60, auth) as c1,
            bench_client(60) as c2,
        ):
            for _ in range(10):  # warm both paths and the prompt cache
                plain_ms(c1, router, body)
                plain_ms(c2, base, body)
            for i in range(args.rounds):
                # alternate the order so neither side always goes first
                pairs = [(c1, router, "router"), (c2, base, "hotmodel")]
                for client, url, name in pairs if i % 2 == 0 else pairs[::-1]:
                    results[f"{name}_plain"].append(plain_ms(client, url, body))
                    results[f"{name}_stream_ttfb"].append(stream_first_byte_ms(client, url, body))

    table = {k: summary(v) for k, v in results.items()}
    out = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "model": args.model,
        "rounds": args.rounds,
        "startup_to_healthy_ms": round(startup_ms),
        "results": table,
        "retries_on_closed_keepalive": {
            "router" if k != base else "hotmodel": v for k, v in RETRIES.items()
        },
        "overhead_p50_ms": {
            "plain": round(table["hotmodel_plain"]["p50_ms"] - table["router_plain"]["p50_ms"], 3),
            "stream_ttfb": round(
                table["hotmodel_stream_ttfb"]["p50_ms"] - table["router_stream_ttfb"]["p50_ms"],
                3,
            ),
        },
    }
    folder = ROOT / "bench-results"
    folder.mkdir(exist_ok=True)
    (folder / f"proxy-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=2))
    print(f"start-up to healthy (router + {args.model} load): {out['startup_to_healthy_ms']} ms")
    print("| path | p50 ms | p90 ms | mean ms |\n| --- | --- | --- | --- |")
    for k, v in table.items():
        print(f"| {k} | {v['p50_ms']} | {v['p90_ms']} | {v['mean_ms']} |")
    print(
        f"overhead p50: plain +{out['overhead_p50_ms']['plain']} ms, "
        f"stream first byte +{out['overhead_p50_ms']['stream_ttfb']} ms"
    )


if __name__ == "__main__":
    main()
