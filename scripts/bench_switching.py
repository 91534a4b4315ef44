"""Sections of scripts/bench.py about changing models and long conversations:
switch, replay_kv, cache.

A switch is compared with what the bare router costs for the same change
(its own unload + load, on a router hotmodel does not manage, started with the
arguments hotmodel would use), interleaved round by round.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from bench_common import Settings, rotate
from bench_common import client as bench_client
from bench_kv import QUESTION, build_session, facts, first_token_of, kv_extra, switch_back
from bench_switch import bare_router, bare_switch, hotmodel_switch
from bench_trim import past_bound, trim_extra, turn_timings
from benchlib import serving, write_demo_config

OTHER = {"smollm2": "gemma3", "gemma3": "smollm2"}


@contextlib.contextmanager
def _bare_router() -> Iterator[str]:
    with (
        tempfile.TemporaryDirectory(prefix="hotmodel-bench-router-") as tmp,
        bare_router(write_demo_config(Path(tmp))) as url,
    ):
        yield url


def _p50(rows: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(float(r[key]) for r in rows), 1)


def switch(base: str, s: Settings) -> dict[str, Any]:
    """hotmodel's switch (client wall time of ``POST /admin/switch``) against the bare
    router's unload + load, both directions, alternating which goes first."""
    router: list[dict[str, Any]] = []
    hot: list[dict[str, Any]] = []
    with _bare_router() as url, bench_client(300) as c:
        current = "smollm2"
        for i in range(s.switch_rounds * 2):
            target = OTHER[current]
            for name in rotate(("router", "hotmodel"), i // 2):
                if name == "router":
                    router.append(bare_switch(c, url, current, target))
                else:
                    hot.append(hotmodel_switch(c, base, target))
            current = target
    directions = {}
    for target in ("gemma3", "smollm2"):
        r = [x for x in router if x["to"] == target]
        h = [{**x["phases"], **x} for x in hot if x["to"] == target]
        directions[f"{OTHER[target]}->{target}"] = {
            "router": {k: _p50(r, k + "_ms") for k in ("unload", "load", "total")},
            "hotmodel": {
                "wall": _p50(h, "client_ms"),
                "report_total": _p50(h, "report_total_ms"),
                "unload": _p50(h, "unload"),
                "load": _p50(h, "load"),
            },
        }
    return {
        "rounds": s.switch_rounds,
        "p50_ms": directions,
        "router_raw": router,
        "hotmodel_raw": hot,
    }


def _router_switch_back(c: httpx.Client, url: str, text: str) -> dict[str, Any]:
    """What a client of the bare router pays for the same: the router's own switch back,
    then the whole conversation sent again with the next turn."""
    model = {"model": "smollm2", "temperature": 0}
    user = {"role": "user", "content": text}
    built = c.post(
        url + "/v1/chat/completions", json={**model, "messages": [user], "max_tokens": 1}
    )
    built.raise_for_status()
    reply = {"role": "assistant", "content": built.json()["choices"][0]["message"]["content"]}
    bare_switch(c, url, "smollm2", "gemma3")
    t0 = time.perf_counter()
    back = bare_switch(c, url, "gemma3", "smollm2")
    turn_started = time.perf_counter()
    body = {
        **model,
        "messages": [user, reply, {"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "stream": True,
    }
    ttft, timings = first_token_of(c, url, body)
    return {
        "session_tokens": built.json()["usage"]["prompt_tokens"],
        "switch_back_ms": round(back["total_ms"], 1),
        "next_turn_first_token_ms": ttft,
        "next_turn_timings": {k: timings.get(k) for k in ("prompt_n", "cache_n", "prompt_ms")},
        "total_ms": round((turn_started - t0) * 1000 + ttft, 1),
    }


def replay_kv(s: Settings) -> dict[str, Any]:
    """Switching back to a model with a conversation: from the start of the switch back to
    the first token of the next turn, with KV restore, with replay, and on the bare router."""
    text = facts(s.kv_items)
    runs: dict[str, list[dict[str, Any]]] = {"kv_restore": [], "replay": [], "router": []}
    with (
        serving(extra=kv_extra(True)) as kv,
        serving(extra=kv_extra(False)) as replay,
        _bare_router() as router,
        bench_client(900) as c,
    ):
        base = {"kv_restore": kv.base_url, "replay": replay.base_url}
        for i in range(s.kv_rounds):
            for name in rotate(tuple(runs), i):
                if name == "router":
                    runs[name].append(_router_switch_back(c, router, text))
                    continue
                session = f"bench-{i}"
                tokens = build_session(c, base[name], text, session)
                runs[name].append({"session_tokens": tokens, **switch_back(c, base[name], session)})
    return {
        "rounds": s.kv_rounds,
        "items": s.kv_items,
        "p50_ms": {
            name: {
                "session_tokens": _p50(rows, "session_tokens"),
                "switch_back": _p50(rows, "switch_back_ms"),
                "next_turn_first_token": _p50(rows, "next_turn_first_token_ms"),
                "total": _p50(rows, "total_ms"),
            }
            for name, rows in runs.items()
        },
        "raw": runs,
    }


def cache(s: Settings) -> dict[str, Any]:
    """A long conversation past its bound (``max_session_messages``, default trimming):
    how much of each turn's prompt llama-server took from its cache."""
    turns: list[dict[str, Any]] = []
    with (
        serving(extra=trim_extra(s.cache_max_messages)) as served,
        bench_client(600) as c,
    ):
        for i in range(s.cache_turns):
            timings = turn_timings(c, served.base_url, i)
            if past_bound(i, s.cache_max_messages):
                cached, evaluated = int(timings["cache_n"]), int(timings["prompt_n"])
                share = cached / max(1, cached + evaluated)
                turns.append({"turn": i, "cache_n": cached, "prompt_n": evaluated, "share": share})
                turns[-1]["prompt_ms"] = round(float(timings["prompt_ms"]), 2)
    cached = sum(t["cache_n"] for t in turns)
    total = cached + sum(t["prompt_n"] for t in turns)
    hits = sum(t["share"] >= 0.9 for t in turns)
    return {
        "turns": s.cache_turns,
        "max_session_messages": s.cache_max_messages,
        "turns_past_bound": len(turns),
        "turns_90_cached": hits,
        "share_of_turns_90_cached": round(hits / max(1, len(turns)), 3),
        "token_share_cached": round(cached / max(1, total), 3),
        "mean_prompt_ms": round(statistics.fmean([t["prompt_ms"] for t in turns] or [0.0]), 2),
        "per_turn": turns,
    }
