"""The targets of scripts/bench.py and the Markdown it writes into docs/performance.md.

Targets are reported (measured value, the bound, met or not), never asserted:
a benchmark on a busy machine must not fail a build.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench_common import PATHS

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
RSS_LIMIT_MB = 80.0


def _target(
    figure: str, measured: float, bound: float, text: str, unit: str = "ms", higher: bool = False
) -> dict[str, Any]:
    met = measured >= bound if higher else measured <= bound
    return {
        "figure": figure,
        "measured": round(measured, 3),
        "bound": round(bound, 3),
        "unit": unit,
        "target": text,
        "met": met,
    }


def _value(value: float, unit: str) -> str:
    if unit == "share":
        return f"{value:.1%}"
    if unit == "x":
        return f"{value:.3f}x"
    return f"{value:,.1f} {unit}" if unit == "MB" else f"{value:,.2f} {unit}"


def _proxy_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    h, rt = r["paths"]["hotmodel"], r["paths"]["router"]

    def fig(kind: str, stat: str) -> tuple[float, float]:
        return float(h[kind][stat]), float(rt[kind][stat])

    out = []
    for kind, stat, slack, label in (
        ("plain", "p50_ms", 0.0, "plain p50 ms"),
        ("plain", "p99_ms", 3.0, "plain p99 ms"),
        ("stream_first_byte", "p50_ms", 1.0, "stream first byte p50 ms"),
        ("chunk_gap", "mean_ms", 1.0, "gap between chunks, mean ms"),
        ("chunk_gap", "p99_ms", 1.0, "gap between chunks, p99 ms"),
    ):
        hv, rv = fig(kind, stat)
        bound = f"≤ router + {slack:g} ms" if slack else "≤ router"
        out.append(_target(f"proxy: {label.removesuffix(' ms')}", hv, rv + slack, bound))
    return out


def _throughput_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for n, paths in r["clients"].items():
        ratio = paths["hotmodel"]["requests_per_s"] / max(1e-9, paths["router"]["requests_per_s"])
        out.append(
            _target(f"throughput: {n} clients, x router", ratio, 0.97, "≥ 0.97 x router", "x", True)
        )
    return out


def _switch_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _target(
            f"switch {direction}: wall time",
            d["hotmodel"]["wall"],
            d["router"]["total"] + 30,
            "≤ router unload + load + 30 ms",
        )
        for direction, d in r["p50_ms"].items()
    ]


def _history_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """On hotmodel's own time (Server-Timing): the time outside the model also holds
    llama-server's work on the longer prompt a session sends, which is not hotmodel's."""
    own = r["hotmodel_own"]
    largest = max(r["stored_messages"], key=int)
    measured = own[largest]["p50_ms"] - own["no_session"]["p50_ms"]
    figure = f"history: {int(largest):,} stored messages, hotmodel's own time over no session"
    return [_target(figure, measured, 2.0, "≤ +2 ms")]


def _cache_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    figure = "cache: share of turns at the bound with ≥ 90 % of the prompt cached"
    return [_target(figure, r["share_of_turns_90_cached"], 0.9, "≥ 90 %", "share", True)]


def _rss_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _target("rss: idle", r["idle_after_load_mb"], RSS_LIMIT_MB, "≤ 80 MB", "MB"),
        _target("rss: under load, peak", r["peak_under_load_mb"], RSS_LIMIT_MB, "≤ 80 MB", "MB"),
    ]


TARGETS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    "proxy": _proxy_targets,
    "throughput": _throughput_targets,
    "switch": _switch_targets,
    "history": _history_targets,
    "cache": _cache_targets,
    "rss": _rss_targets,
}


def targets(sections: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, result in sections.items():
        if name in TARGETS:
            out.extend(TARGETS[name](result))
    return out


def _n(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _met(t: dict[str, Any]) -> str:
    return "met" if t["met"] else "**not met**"


def _cell(t: dict[str, Any]) -> str:
    return f"{t['target']}: {_met(t)}"


def _proxy_md(r: dict[str, Any]) -> list[str]:
    p = r["paths"]
    checks = {t["figure"]: t for t in _proxy_targets(r)}
    rows = []
    for kind, stat, label in (
        ("plain", "p50_ms", "plain p50 ms"),
        ("plain", "p99_ms", "plain p99 ms"),
        ("stream_first_byte", "p50_ms", "stream first byte p50 ms"),
        ("stream_first_byte", "p99_ms", "stream first byte p99 ms"),
        ("chunk_gap", "mean_ms", "gap between chunks, mean ms"),
        ("chunk_gap", "p99_ms", "gap between chunks, p99 ms"),
    ):
        values = [float(p[path][kind][stat]) for path in PATHS]
        check = checks.get(f"proxy: {label.removesuffix(' ms')}")
        diff = f"{values[2] - values[1]:+.2f}"
        rows.append([label, *(_n(v) for v in values), diff, _cell(check) if check else "-"])
    intro = (
        f"{r['rounds']} rounds, each path in turn: a 1-token request, and a stream of "
        f"{r['stream_max_tokens']} tokens (`ignore_eos`); keep-alive client per path."
    )
    head = ["figure", "child", "router", "hotmodel", "hotmodel - router", "target"]
    return ["### Proxy: one request, three paths", "", intro, "", *_table(head, rows)]


def _throughput_md(r: dict[str, Any]) -> list[str]:
    checks = _throughput_targets(r)
    rows = []
    for (n, paths), check in zip(r["clients"].items(), checks, strict=True):
        rps = [paths[p]["requests_per_s"] for p in PATHS]
        errors = "/".join(str(paths[p]["errors"]) for p in PATHS)
        rows.append([n, *(_n(v, 1) for v in rps), f"{check['measured']:.3f}", errors, _cell(check)])
    intro = (
        f"N keep-alive clients sending 1-token requests back to back, {r['seconds_per_path']:g} s "
        f"per path in {r['blocks']} interleaved blocks; requests per second."
    )
    head = ["clients", "child", "router", "hotmodel", "hotmodel / router"]
    head += ["failed (child/router/hotmodel)", "target"]
    return ["### Throughput", "", intro, "", *_table(head, rows)]


def _switch_md(r: dict[str, Any]) -> list[str]:
    rows = []
    for (direction, d), check in zip(r["p50_ms"].items(), _switch_targets(r), strict=True):
        router, hot = d["router"], d["hotmodel"]
        diff = f"{hot['wall'] - router['total']:+.1f}"
        cells = [
            router["unload"],
            router["load"],
            router["total"],
            hot["unload"],
            hot["load"],
            hot["wall"],
        ]
        rows.append([direction, *(_n(v, 1) for v in cells), diff, _cell(check)])
    intro = (
        f"p50 of {r['rounds']} switches each way, alternating with the bare router's own "
        "unload + load (a second router, not managed by hotmodel, same arguments). hotmodel: "
        "client wall time of `POST /admin/switch`, and its report's unload and load phases."
    )
    head = ["switch", "router unload", "router load", "router unload + load"]
    head += ["hotmodel unload", "hotmodel load", "hotmodel wall", "hotmodel - router", "target"]
    return ["### Switch, ms", "", intro, "", *_table(head, rows)]


def _replay_kv_md(r: dict[str, Any]) -> list[str]:
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
            _n(d["switch_back"], 1),
            _n(d["next_turn_first_token"], 1),
            f"**{_n(d['total'], 1)}**",
        ]
        rows.append([labels[name], f"{d['session_tokens']:.0f}", *cells, f"{factor:.1f}x"])
    intro = (
        f"A session of one long turn ({r['items']} facts) on SmolLM2, a switch to Gemma, then "
        "the clock: the switch back to SmolLM2 and the next turn's first token (p50 of "
        f"{r['rounds']}). The bare router's client sends the whole conversation again."
    )
    head = ["switch back by", "session tokens", "switch back ms", "next turn first token ms"]
    head += ["total ms", "faster than bare router"]
    return ["### Switching back to a conversation", "", intro, "", *_table(head, rows)]


def _history_md(r: dict[str, Any]) -> list[str]:
    base, own = r["no_session"], r["hotmodel_own"]
    rows = [
        [
            "no session",
            *(_n(base[p]["p50_ms"]) for p in PATHS),
            _n(own["no_session"]["p50_ms"]),
            "-",
            "-",
        ]
    ]
    check = _history_targets(r)[0]
    largest = max(r["stored_messages"], key=int)
    for n, v in r["stored_messages"].items():
        diff = f"{own[n]['p50_ms'] - own['no_session']['p50_ms']:+.2f}"
        rows.append(
            [
                f"session, {int(n):,} stored",
                "-",
                "-",
                _n(v["p50_ms"]),
                _n(own[n]["p50_ms"]),
                diff,
                _cell(check) if n == largest else "-",
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
        *_table(head, rows),
    ]


def _cache_md(r: dict[str, Any]) -> list[str]:
    check = _cache_targets(r)[0]
    row = [
        str(r["turns"]),
        str(r["max_session_messages"]),
        str(r["turns_past_bound"]),
        f"{r['turns_90_cached']} ({r['share_of_turns_90_cached']:.0%})",
        f"{r['token_share_cached']:.0%}",
        _n(r["mean_prompt_ms"], 1),
        _cell(check),
    ]
    intro = (
        "One session on SmolLM2, short turns, `max_session_messages` as below and the default "
        "`trim_low_water`; llama-server's `cache_n` / `prompt_n` of each turn past the bound. "
        "hotmodel only: the model has one slot, other traffic in between would evict the cache."
    )
    head = ["turns", "bound (messages)", "turns past the bound", "turns ≥ 90 % cached"]
    head += ["prompt tokens from cache", "mean prompt ms", "target"]
    return ["### Prompt-cache reuse over a long conversation", "", intro, "", *_table(head, [row])]


def _rss_md(r: dict[str, Any]) -> list[str]:
    idle, peak = _rss_targets(r)
    rows = [
        ["idle, after start", _n(r["idle_start_mb"], 1), "-"],
        ["idle, after the load", _n(r["idle_after_load_mb"], 1), _cell(idle)],
        ["under load, peak", _n(r["peak_under_load_mb"], 1), _cell(peak)],
    ]
    intro = (
        "hotmodel's own process (not the llama-server processes). The peak: sampled every "
        f"{r['sampled_every_ms']} ms through every section run on the same `hotmodel serve` "
        f"(throughput included, when run) and a last burst of {r['burst_clients']} clients."
    )
    return [
        "### hotmodel's memory (RSS), MB",
        "",
        intro,
        "",
        *_table(["figure", "MB", "target"], rows),
    ]


def _scheduling_md(r: dict[str, Any]) -> list[str]:
    rows = []
    for way, levels in r["ways"].items():
        for clients, m in levels.items():
            lat = m["latency"]
            rows.append(
                [
                    way,
                    clients,
                    _n(m["requests_per_min"], 1),
                    _n(m["switches_per_min"], 1),
                    _n(lat["p50_ms"], 0),
                    _n(lat["p99_ms"], 0),
                    _n(lat["max_ms"], 0),
                ]
            )
    return [
        "### Scheduling: closed-loop clients over two models",
        "",
        f"Each client loops on its own model (SmolLM2 or Gemma, alternately), {r['seconds']:g} s "
        "per row; `per_request`: `max_wait_seconds = 0` (a switch for every request for the "
        "other model, as before the scheduler), `scheduler`: the defaults.",
        "",
        *_table(
            ["way", "clients", "requests/min", "switches/min", "p50 ms", "p99 ms", "max ms"],
            rows,
        ),
    ]


SECTIONS_MD: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "proxy": _proxy_md,
    "throughput": _throughput_md,
    "switch": _switch_md,
    "replay_kv": _replay_kv_md,
    "history": _history_md,
    "cache": _cache_md,
    "rss": _rss_md,
    "scheduling": _scheduling_md,
}


def _header(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    gpus = ", ".join(m["gpus"]) or "no GPU"
    models = ", ".join(f"`{name}`" for name in result["models"].values())
    lines = [
        f"Written by `{result['command']}` on {result['date']}: {m['cpu_model']}, "
        f"{m['cpus']} cores, {gpus}; {m['platform']}, Python {m['python']}; llama.cpp "
        f"`{result['llama_cpp']['version']}`; models {models}. Raw figures: `{result['json']}`.",
        "",
    ]
    if result["smoke"]:
        lines += ["**Smoke run: too few rounds for any figure to mean anything.**", ""]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The block between the bench markers of docs/performance.md."""
    lines = _header(result)
    checks = result["targets"]
    if checks:
        rows = [
            [t["figure"], _value(t["measured"], t["unit"]), _value(t["bound"], t["unit"]), _cell(t)]
            for t in checks
        ]
        lines += ["### Targets", "", *_table(["figure", "hotmodel", "bound", "target"], rows)]
    for name, section in result["sections"].items():
        lines += SECTIONS_MD[name](section)
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the markers replaced by ``block``."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"the markers {BEGIN} ... {END} are missing")
    return text[: begin + len(BEGIN)] + "\n" + block + text[end:]
