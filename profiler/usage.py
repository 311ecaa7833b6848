"""Usage probabilities and dependency weights, three ways, all as P(per request):

- `from_spec`: the spec's expected category mix and trigger probabilities (`experts.graph`);
- `from_runs`: counted over CoE runs of a generated sample (`experts.offline.run_coe`);
- `from_traces`: counted over recorded request traces (the serving path's `experts` trace, one JSON
  object per line, as `expertmesh station --traces FILE` writes them).

`weighted_graph` writes the weights onto the dependency graph (edge attribute `weight`, node
attribute `usage`), to look at them as a graph. The planner does not read the graph: the placement
problem (`cluster.demand.placement_problem`, for `expertmesh plan` and the placement controller)
takes the same weights from the `UsageProfile`'s edges.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import networkx as nx

from expertmesh.errors import InvalidArgument
from expertmesh.experts.graph import build_graph, usage_probabilities
from expertmesh.experts.spec import CoESpec
from expertmesh.profiler.store import EdgeWeight, UsageProfile


def from_spec(spec: CoESpec) -> UsageProfile:
    g = build_graph(spec)
    usage = usage_probabilities(spec)
    edges = []
    for up, down, data in g.edges(data=True):
        # P(call on this edge) = P(upstream invoked) * P(edge fires | upstream invoked)
        p = data["probability"] if up == spec.router.expert else usage[up] * data["probability"]
        edges.append(EdgeWeight(upstream=up, downstream=down, kind=data["kind"], probability=min(1.0, p)))
    return UsageProfile(source="spec", num_requests=0, usage=usage, edges=sorted(edges, key=_edge_key))


def _count(spec: CoESpec, requests: Iterable[list[tuple[str, str, str]]], source: str) -> UsageProfile:
    """Each request is its calls as (expert, reason, because_of); the router call has reason 'router'."""
    invoked: Counter[str] = Counter()
    edges: Counter[tuple[str, str, str]] = Counter()
    n = 0
    for calls in requests:
        n += 1
        for expert in {e for e, _, _ in calls}:
            invoked[expert] += 1
        for expert, reason, because_of in calls:
            if reason == "router":
                continue
            upstream = because_of if reason == "dependency" else spec.router.expert
            edges[(upstream, expert, reason)] += 1
    if n == 0:
        raise InvalidArgument("no requests to count usage from", field="traces", fix="record some traffic first")
    names = {e.name for e in spec.experts}
    unknown = sorted((set(invoked) - names))
    if unknown:
        raise InvalidArgument(f"traces name experts the spec does not have: {', '.join(unknown)}", field="traces",
                              fix="use traces recorded against this spec")
    return UsageProfile(
        source=source, num_requests=n, usage={name: invoked[name] / n for name in sorted(names)},
        edges=sorted((EdgeWeight(upstream=u, downstream=d, kind=k, probability=c / n) for (u, d, k), c in edges.items()),
                     key=_edge_key))


def from_runs(spec: CoESpec, runs) -> UsageProfile:
    """From `experts.offline.run_coe` results."""
    def calls(run) -> list[tuple[str, str, str]]:
        return [(spec.router.expert, "router", "")] + [(o.expert, c.reason.value, c.because_of or "") for c, o in run.calls]

    return _count(spec, (calls(r) for r in runs), "sample")


def from_traces(spec: CoESpec, path: Path) -> UsageProfile:
    def requests():
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    yield [(t["expert"], t["reason"], t.get("because_of", "")) for t in doc["experts"]]
                except (ValueError, KeyError, TypeError) as exc:
                    raise InvalidArgument(f"{path}:{lineno} is not a trace record ({exc})", field="traces",
                                          fix="give a JSONL file of responses with an `experts` list") from None

    return _count(spec, requests(), "traces")


def weighted_graph(spec: CoESpec, usage: UsageProfile) -> nx.DiGraph:
    """The dependency graph with `weight` (P per request) on every edge and `usage` on every node."""
    g = build_graph(spec)
    for e in g.edges:
        g.edges[e]["weight"] = 0.0
    for w in usage.edges:
        if g.has_edge(w.upstream, w.downstream):
            g.edges[w.upstream, w.downstream]["weight"] += w.probability
        else:  # a call the spec's graph has no edge for (e.g. a rule adding an expert): keep it
            g.add_edge(w.upstream, w.downstream, kind=w.kind, probability=0.0, weight=w.probability)
    for name in g.nodes:
        g.nodes[name]["usage"] = usage.usage.get(name, 0.0)
    return g


def _edge_key(e: EdgeWeight) -> tuple[str, str, str]:
    return e.upstream, e.downstream, e.kind
