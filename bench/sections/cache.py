"""The ``cache`` section: prompt-cache reuse over a long conversation held at its bound
(``[session] max_session_messages``, default trimming): how much of each turn's prompt
llama-server took from its cache."""

from __future__ import annotations

import statistics
from typing import Any

import httpx

from bench.harness import Settings, client, serving
from bench.results import cell, n, table, target


def turn_timings(c: httpx.Client, base: str, i: int, session: str = "long") -> dict[str, Any]:
    """Turn ``i`` of the long conversation; llama-server's timings of it."""
    answer = c.post(
        base + "/v1/chat/completions",
        json={
            "messages": [
                {"role": "user", "content": f"Tell me one short fact about the number {i}."}
            ],
            "max_tokens": 12,
            "temperature": 0,
            "session_id": session,
        },
    )
    answer.raise_for_status()
    timings: dict[str, Any] = answer.json()["timings"]
    return timings


def trim_extra(max_messages: int, low_water: float | None = None) -> str:
    """The ``[session]`` lines of a `hotmodel serve` bounding its sessions."""
    extra = f"[session]\nmax_session_messages = {max_messages}\n"
    return extra + (f"trim_low_water = {low_water}\n" if low_water is not None else "")


def past_bound(i: int, max_messages: int) -> bool:
    """Turn ``i`` (from 0) is sent past the bound: trimming is at work."""
    return 2 * (i + 1) > max_messages


def measure(s: Settings) -> dict[str, Any]:
    """A long conversation past its bound: how much of each turn's prompt llama-server
    took from its cache."""
    turns: list[dict[str, Any]] = []
    with (
        serving(extra=trim_extra(s.cache_max_messages)) as served,
        client(600) as c,
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


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    figure = "cache: share of turns at the bound with ≥ 90 % of the prompt cached"
    return [target(figure, r["share_of_turns_90_cached"], 0.9, "≥ 90 %", "share", True)]


def markdown(r: dict[str, Any]) -> list[str]:
    [check] = targets(r)
    row = [
        str(r["turns"]),
        str(r["max_session_messages"]),
        str(r["turns_past_bound"]),
        f"{r['turns_90_cached']} ({r['share_of_turns_90_cached']:.0%})",
        f"{r['token_share_cached']:.0%}",
        n(r["mean_prompt_ms"], 1),
        cell(check),
    ]
    intro = (
        "One session on SmolLM2, short turns, `max_session_messages` as below and the default "
        "`trim_low_water`; llama-server's `cache_n` / `prompt_n` of each turn past the bound. "
        "hotmodel only: the model has one slot, other traffic in between would evict the cache."
    )
    head = ["turns", "bound (messages)", "turns past the bound", "turns ≥ 90 % cached"]
    head += ["prompt tokens from cache", "mean prompt ms", "target"]
    return ["### Prompt-cache reuse over a long conversation", "", intro, "", *table(head, [row])]
