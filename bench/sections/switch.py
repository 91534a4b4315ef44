"""The ``switch`` section: hotmodel's switch (client wall time of ``POST /admin/switch``)
against what the bare router costs for the same change (its own unload + load, on a
router hotmodel does not manage, started with the arguments hotmodel would use),
both directions, interleaved round by round."""

from __future__ import annotations

from typing import Any

from bench.harness import (
    OTHER,
    Settings,
    bare_router,
    bare_switch,
    client,
    hotmodel_switch,
    p50,
    rotate,
)
from bench.results import cell, n, table, target


def measure(base: str, s: Settings) -> dict[str, Any]:
    """hotmodel's switch against the bare router's unload + load, both directions,
    alternating which goes first."""
    router: list[dict[str, Any]] = []
    hot: list[dict[str, Any]] = []
    with bare_router() as url, client(300) as c:
        current = "smollm2"
        for i in range(s.switch_rounds * 2):
            want = OTHER[current]
            for name in rotate(("router", "hotmodel"), i // 2):
                if name == "router":
                    router.append(bare_switch(c, url, current, want))
                else:
                    hot.append(hotmodel_switch(c, base, want))
            current = want
    directions = {}
    for want in ("gemma3", "smollm2"):
        r = [x for x in router if x["to"] == want]
        h = [{**x["phases"], **x} for x in hot if x["to"] == want]

        def median(rows: list[dict[str, Any]], key: str) -> float:
            return p50([float(row[key]) for row in rows])

        directions[f"{OTHER[want]}->{want}"] = {
            "router": {k: median(r, k + "_ms") for k in ("unload", "load", "total")},
            "hotmodel": {
                "wall": median(h, "client_ms"),
                "report_total": median(h, "report_total_ms"),
                "unload": median(h, "unload"),
                "load": median(h, "load"),
            },
        }
    return {
        "rounds": s.switch_rounds,
        "p50_ms": directions,
        "router_raw": router,
        "hotmodel_raw": hot,
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        target(
            f"switch {direction}: wall time",
            d["hotmodel"]["wall"],
            d["router"]["total"] + 30,
            "≤ router unload + load + 30 ms",
        )
        for direction, d in r["p50_ms"].items()
    ]


def markdown(r: dict[str, Any]) -> list[str]:
    rows = []
    for (direction, d), check in zip(r["p50_ms"].items(), targets(r), strict=True):
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
        rows.append([direction, *(n(v, 1) for v in cells), diff, cell(check)])
    intro = (
        f"p50 of {r['rounds']} switches each way, alternating with the bare router's own "
        "unload + load (a second router, not managed by hotmodel, same arguments). hotmodel: "
        "client wall time of `POST /admin/switch`, and its report's unload and load phases."
    )
    head = ["switch", "router unload", "router load", "router unload + load"]
    head += ["hotmodel unload", "hotmodel load", "hotmodel wall", "hotmodel - router", "target"]
    return ["### Switch, ms", "", intro, "", *table(head, rows)]
