"""Observed traffic: each expert's invocation rate, scraped from every node's metrics endpoint.

The placement controller compares what it sees with the usage the running plan assumed
(`cluster.replan.decide`). Pure parts: `parse_invocations` reads one scrape, `counter_increase` is
Prometheus's `increase()` over two scrapes (a series that went down was reset - its replica
restarted - and counts from zero), `observed_usage` turns increases into P(expert invoked per
request) (the router classifiers' calls are the requests), and `observed_profile` rescales the
profile's dependency edges to the observed rates (the metric has no upstream label, so each edge
keeps the spec's shape). `UsageWatch` is the glue: it scrapes, keeps a sliding window and answers
with the usage over it.
"""

from __future__ import annotations

import time
import urllib.request
from collections import deque
from collections.abc import Callable, Collection

from prometheus_client.parser import text_string_to_metric_families

from expertmesh.metrics import EXPORTED_PREFIX
from expertmesh.profiler.store import EdgeWeight, UsageProfile

METRIC = EXPORTED_PREFIX + "expertmesh_expert_invocations_total"
SeriesKey = tuple[tuple[str, str], ...]


def parse_invocations(text: str) -> dict[SeriesKey, float]:
    """Every series of the invocations counter in one /metrics page, keyed by all its labels."""
    out: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == METRIC:
                out[tuple(sorted(sample.labels.items()))] = float(sample.value)
    return out


def counter_increase(prev: dict[SeriesKey, float], now: dict[SeriesKey, float]) -> dict[SeriesKey, float]:
    """Per series: now - prev, or now where the counter went down (reset) or is new. Gone series add nothing."""
    return {k: (v - prev[k] if k in prev and v >= prev[k] else v) for k, v in now.items()}


def by_expert_reason(increase: dict[SeriesKey, float]) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for key, v in increase.items():
        labels = dict(key)
        k = (labels.get("expert", ""), labels.get("reason", ""))
        out[k] = out.get(k, 0.0) + v
    return out


def observed_usage(calls: dict[tuple[str, str], float],
                   routers: Collection[str] | None = None) -> tuple[dict[str, float], float]:
    """(P(expert invoked per request), requests): requests are the router classifiers' calls (reason 'router': one
    per request, whichever CoE and revision it took; canary shadows are not counted). `routers`: count only these
    classifiers' (None: every classifier, so a live change that brings a new one is counted too)."""
    requests = sum(v for (e, r), v in calls.items() if r == "router" and (routers is None or e in routers))
    if requests <= 0:
        return {}, 0.0
    usage: dict[str, float] = {}
    for (expert, _), v in calls.items():
        usage[expert] = usage.get(expert, 0.0) + v
    return {e: min(1.0, v / requests) for e, v in sorted(usage.items())}, requests


def observed_profile(planned: UsageProfile, usage: dict[str, float], num_requests: int) -> UsageProfile:
    """The profile's edges rescaled so each downstream expert's calls match its observed rate."""
    edges = []
    for e in planned.edges:
        before = planned.usage.get(e.downstream, 0.0)
        scale = usage.get(e.downstream, 0.0) / before if before > 0 else 0.0
        edges.append(EdgeWeight(upstream=e.upstream, downstream=e.downstream, kind=e.kind,
                                probability=min(1.0, e.probability * scale)))
    merged = {**{k: 0.0 for k in planned.usage}, **usage}
    return UsageProfile(source="traces", num_requests=num_requests, usage=merged, edges=edges)


def _fetch(target: str, timeout_s: float = 3.0) -> str:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=timeout_s) as r:
        return r.read().decode()


class UsageWatch:
    """Scrapes the invocations counter from every target each `poll()` and reports usage over the last `window_s`
    (None until the window holds `min_requests` requests, so a quiet minute never looks like drift)."""

    def __init__(self, targets: Callable[[], list[str]], routers: Collection[str] | None = None, *, window_s: float = 60.0,
                 min_requests: int = 50, clock: Callable[[], float] = time.monotonic,
                 fetch: Callable[[str], str] = _fetch) -> None:
        self.targets, self.routers, self.window_s, self.min_requests = targets, routers, window_s, min_requests
        self.clock, self.fetch = clock, fetch
        self._last: dict[SeriesKey, float] | None = None
        self._window: deque[tuple[float, dict[tuple[str, str], float]]] = deque()

    def _scrape(self) -> dict[SeriesKey, float]:
        out: dict[SeriesKey, float] = {}
        for target in self.targets():
            try:
                for k, v in parse_invocations(self.fetch(target)).items():
                    out[k + (("_target", target),)] = v
            except OSError:  # a node going away: its series are simply absent this time
                continue
        return out

    def poll(self) -> tuple[dict[str, float], int] | None:
        now_s, now = self.clock(), self._scrape()
        if self._last is not None:
            self._window.append((now_s, by_expert_reason(counter_increase(self._last, now))))
        self._last = now
        while self._window and self._window[0][0] < now_s - self.window_s:
            self._window.popleft()
        total: dict[tuple[str, str], float] = {}
        for _, calls in self._window:
            for k, v in calls.items():
                total[k] = total.get(k, 0.0) + v
        usage, requests = observed_usage(total, self.routers)
        return (usage, int(requests)) if requests >= self.min_requests else None
