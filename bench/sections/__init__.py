"""The sections of the one run, one module each, named as the section's key in the
results: each has ``measure(...)``, ``targets(result)`` and ``markdown(result)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.sections import (
    cache,
    cluster,
    endpoints,
    history,
    proxy,
    replay_kv,
    rss,
    scheduling,
    switch,
    throughput,
)


@dataclass(frozen=True)
class Report:
    """What the results say of a section: its targets and its Markdown lines."""

    targets: Callable[[dict[str, Any]], list[dict[str, Any]]]
    markdown: Callable[[dict[str, Any]], list[str]]


# in the results' order
REPORTS: dict[str, Report] = {
    "proxy": Report(proxy.targets, proxy.markdown),
    "endpoints": Report(endpoints.targets, endpoints.markdown),
    "throughput": Report(throughput.targets, throughput.markdown),
    "switch": Report(switch.targets, switch.markdown),
    "replay_kv": Report(replay_kv.targets, replay_kv.markdown),
    "history": Report(history.targets, history.markdown),
    "cache": Report(cache.targets, cache.markdown),
    "rss": Report(rss.targets, rss.markdown),
    "scheduling": Report(scheduling.targets, scheduling.markdown),
    "cluster": Report(cluster.targets, cluster.markdown),
}
SECTIONS = tuple(REPORTS)


def targets(sections: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the sections measured, in their order."""
    return [t for name, result in sections.items() for t in REPORTS[name].targets(result)]


def markdown(sections: dict[str, Any]) -> list[list[str]]:
    """Each measured section's Markdown lines, in their order."""
    return [REPORTS[name].markdown(result) for name, result in sections.items()]
