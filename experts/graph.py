"""The expert dependency graph of a CoE spec, and per-expert usage probabilities.

Nodes are experts; the router expert is the root. Edges:
  router -> expert      kind="table":      P(the router sends a request there) from the category mix
  router -> fallback    kind="fallback":   the spec's expected fallback probability
  upstream -> downstream kind="dependency": P(trigger | upstream ran)
Usage probability of an expert = P(a request invokes it), propagated down the DAG per category,
treating the triggers of different upstream experts as independent. Pure code.
"""

from __future__ import annotations

import networkx as nx

from expertmesh.experts.spec import CoESpec


def default_trigger_probability(spec: CoESpec, upstream: str, on_labels: list[str]) -> float:
    """Uninformed prior when the spec gives none: the share of the upstream's labels that trigger."""
    return len(on_labels) / len(spec.expert(upstream).labels)


def build_graph(spec: CoESpec) -> nx.DiGraph:
    g = nx.DiGraph(name=spec.name)
    for e in spec.experts:
        g.add_node(e.name, task=e.task, router=e.name == spec.router.expert)
    root = spec.router.expert
    routed = 1.0 - spec.router.expected_fallback_probability
    for c in spec.categories:
        for name in c.experts:
            if g.has_edge(root, name):
                g.edges[root, name]["probability"] += routed * c.probability
                g.edges[root, name]["categories"].append(c.name)
            else:
                g.add_edge(root, name, kind="table", probability=routed * c.probability, categories=[c.name])
    if spec.router.fallback_expert:
        g.add_edge(root, spec.router.fallback_expert, kind="fallback",
                   probability=spec.router.expected_fallback_probability, categories=[])
    for d in spec.dependencies:
        p = d.trigger_probability
        if p is None:
            p = default_trigger_probability(spec, d.upstream, d.on_labels)
        g.add_edge(d.upstream, d.downstream, kind="dependency", probability=p, on_labels=list(d.on_labels))
    return g


def longest_chain(spec: CoESpec) -> int:
    """Dependency edges on the longest trigger chain (0 when no expert triggers another)."""
    g = nx.DiGraph([(d.upstream, d.downstream) for d in spec.dependencies])
    return nx.dag_longest_path_length(g) if g.number_of_edges() else 0


def dependency_order(spec: CoESpec) -> list[str]:
    """Experts in an order where every upstream comes before its downstream (deterministic)."""
    return list(nx.lexicographical_topological_sort(build_graph(spec)))


def invocation_probabilities(spec: CoESpec, category: str, graph: nx.DiGraph | None = None) -> dict[str, float]:
    """P(expert invoked | the router chose `category`), for every expert (the router: 1)."""
    g = graph if graph is not None else build_graph(spec)
    direct = set(spec.category(category).experts)
    p: dict[str, float] = {}
    for node in nx.lexicographical_topological_sort(g):
        if node == spec.router.expert:
            p[node] = 1.0
            continue
        miss = 0.0 if node in direct else 1.0
        for up, _, data in g.in_edges(node, data=True):
            if data["kind"] == "dependency":
                miss *= 1.0 - p[up] * data["probability"]
        p[node] = 1.0 - miss
    return p


def usage_probabilities(spec: CoESpec) -> dict[str, float]:
    """P(a request invokes the expert), mixing categories by the spec's expected mix and adding the fallback."""
    g = build_graph(spec)
    fb = spec.router.expected_fallback_probability
    usage = {name: 0.0 for name in g.nodes}
    for c in spec.categories:
        for name, p in invocation_probabilities(spec, c.name, g).items():
            usage[name] += (1.0 - fb) * c.probability * p
    usage[spec.router.expert] = 1.0
    if spec.router.fallback_expert:
        usage[spec.router.fallback_expert] += fb  # a fallback request reaches nothing else: disjoint events
    return usage
