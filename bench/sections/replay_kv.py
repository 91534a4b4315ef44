"""The ``replay_kv`` section: switching back to a model with a conversation, from the
start of the switch back to the first token of the next turn, with KV restore
(``[switch] kv_snapshots = true``), with replay, and on the bare router (whose client
sends the whole conversation again)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from bench.harness import Settings, bare_router, bare_switch, client, p50, rotate, serving
from bench.results import n, table

QUESTION = "Which shelf is item7 on?"


def facts(items: int) -> str:
    """One long user turn: ``items`` facts of about 9 tokens each."""
    return " ".join(f"item{i} is on shelf {i % 17}." for i in range(items))


def kv_extra(kv: bool) -> str:
    """The ``[switch]`` lines of a `hotmodel serve` with KV snapshots on or off."""
    return f"[switch]\nkv_snapshots = {str(kv).lower()}\nreplay_session = true\nauto = true"


def first_token_of(
    c: httpx.Client, base: str, body: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """Milliseconds to the first content chunk of streamed ``body``, and its final timings."""
    t0 = time.perf_counter()
    first = None
    timings: dict[str, Any] = {}
    with c.stream("POST", base + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            for choice in data.get("choices") or []:
                if first is None and (choice.get("delta") or {}).get("content"):
                    first = (time.perf_counter() - t0) * 1000
            timings = data.get("timings") or timings
    return round(first or 0.0, 1), timings


def _turn(text: str, session: str, **body: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "session_id": session,
        **body,
    }


def build_session(c: httpx.Client, base: str, text: str, session: str = "bench") -> int:
    """A session whose one user turn is ``text`` (1-token answer); its prompt tokens."""
    built = c.post(base + "/v1/chat/completions", json=_turn(text, session, max_tokens=1))
    built.raise_for_status()
    return int(built.json()["usage"]["prompt_tokens"])


def switch_back(
    c: httpx.Client, base: str, session: str = "bench", pause: float = 0.0, auto: bool = False
) -> dict[str, Any]:
    """Switch away to Gemma (not timed), wait ``pause`` seconds (the time spent with the
    other model), then time the switch back to SmolLM2 and the next turn's first token:
    ``POST /admin/switch``, then the turn; ``auto``: the turn itself, naming SmolLM2
    (``[switch] auto``: a chat UI's model picker), switches back."""
    away = c.post(base + "/admin/switch", json={"model": "gemma3"}).json()
    assert away["outcome"] == "ok", away
    time.sleep(pause)
    t0 = time.perf_counter()
    turn = _turn(QUESTION, session, max_tokens=8, stream=True)
    if auto:
        total, timings = first_token_of(c, base, {**turn, "model": "smollm2"})
        ttft = switch_ms = None  # one request: its switch and its turn are not apart
    else:
        back = c.post(base + "/admin/switch", json={"model": "smollm2"}).json()
        switch_ms = round((time.perf_counter() - t0) * 1000, 1)
        assert back["outcome"] == "ok", back
        turn_started = time.perf_counter()
        ttft, timings = first_token_of(c, base, turn)
        # to the first token: the switch back, then the turn's time to its first token
        total = (turn_started - t0) * 1000 + ttft
    # the turn's cache_n proved the restore (or not): the report in the history says so
    back = c.get(base + "/admin/switches").json()["data"][0]
    assert back["to"] == "smollm2" and back["outcome"] == "ok", back
    return {
        "saved": away["snapshot"].get("save"),
        "restore": back["snapshot"].get("restore"),
        "replay": back["replay"],
        "phases": back["phases"],
        "switch_back_ms": switch_ms,
        "next_turn_first_token_ms": ttft,
        "next_turn_timings": {k: timings.get(k) for k in ("prompt_n", "cache_n", "prompt_ms")},
        "total_ms": round(total, 1),
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


def measure(s: Settings) -> dict[str, Any]:
    """Switching back to a model with a conversation: from the start of the switch back to
    the first token of the next turn, with KV restore, with replay, and on the bare router."""
    text = facts(s.kv_items)
    runs: dict[str, list[dict[str, Any]]] = {"kv_restore": [], "replay": [], "router": []}
    with (
        serving(extra=kv_extra(True)) as kv,
        serving(extra=kv_extra(False)) as replaying,
        bare_router() as router,
        client(900) as c,
    ):
        base = {"kv_restore": kv.base_url, "replay": replaying.base_url}
        for i in range(s.kv_rounds):
            for name in rotate(tuple(runs), i):
                if name == "router":
                    runs[name].append(_router_switch_back(c, router, text))
                    continue
                session = f"bench-{i}"
                tokens = build_session(c, base[name], text, session)
                runs[name].append({"session_tokens": tokens, **switch_back(c, base[name], session)})

    def median(rows: list[dict[str, Any]], key: str) -> float:
        return p50([float(row[key]) for row in rows])

    return {
        "rounds": s.kv_rounds,
        "items": s.kv_items,
        "p50_ms": {
            name: {
                "session_tokens": median(rows, "session_tokens"),
                "switch_back": median(rows, "switch_back_ms"),
                "next_turn_first_token": median(rows, "next_turn_first_token_ms"),
                "total": median(rows, "total_ms"),
            }
            for name, rows in runs.items()
        },
        "raw": runs,
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    return []  # compared with the bare router in its table, no target of its own


def markdown(r: dict[str, Any]) -> list[str]:
    runs = r["p50_ms"]
    router_total = runs["router"]["total"]
    labels = {
        "kv_restore": "hotmodel, KV restore",
        "replay": "hotmodel, replay",
        "router": "bare router",
    }
    rows = []
    for name, d in runs.items():
        factor = router_total / max(1e-9, d["total"])
        cells = [
            n(d["switch_back"], 1),
            n(d["next_turn_first_token"], 1),
            f"**{n(d['total'], 1)}**",
        ]
        rows.append([labels[name], f"{d['session_tokens']:.0f}", *cells, f"{factor:.1f}x"])
    intro = (
        f"A session of one long turn ({r['items']} facts) on SmolLM2, a switch to Gemma, then "
        "the clock: the switch back to SmolLM2 and the next turn's first token (p50 of "
        f"{r['rounds']}). The bare router's client sends the whole conversation again."
    )
    head = ["switch back by", "session tokens", "switch back ms", "next turn first token ms"]
    head += ["total ms", "faster than bare router"]
    return ["### Switching back to a conversation", "", intro, "", *table(head, rows)]
