"""The placement problem of a spec: experts' memory and compute from the profile, edge weights from usage.

memory = weights + peak activations at the expert's serving batch (the profile's largest useful
batch); compute load = requests/s x P(invoked) x per-image time at that batch (core-seconds per
second); edge weight = requests/s x P(the dependent call happens). The router's classifier is
needed by every request, so it gets a replica on every node.
"""

from __future__ import annotations

from expertmesh.cluster.placement import Edge, ExpertDemand, NodeCapacity, PlacementConfig, PlacementProblem
from expertmesh.errors import FailedPrecondition
from expertmesh.experts.spec import CoESpec
from expertmesh.profiler.serving_profiles import serving_batch
from expertmesh.profiler.store import ExpertProfile, UsageProfile


def expert_memory_bytes(p: ExpertProfile) -> int:
    """What a replica holds at its serving batch: the batch's measured peak (weights included), at least the weights."""
    return max(serving_batch(p).peak_bytes, p.footprint_bytes)


def placement_problem(spec: CoESpec, profiles: dict[str, ExpertProfile], usage: UsageProfile,
                      nodes: list[NodeCapacity], requests_per_s: float,
                      config: PlacementConfig | None = None,
                      current: dict[str, list[str]] | None = None) -> PlacementProblem:
    missing = [e.name for e in spec.experts if e.name not in profiles]
    if missing:
        raise FailedPrecondition(f"no current profile for {', '.join(missing)}", field="profile",
                                 fix="run `expertmesh profile` (placement needs each expert's memory and speed)")
    experts = []
    for e in spec.experts:
        p = profiles[e.name]
        per_item_s = p.per_item_ms(p.max_useful_batch) / 1000.0
        experts.append(ExpertDemand(name=e.name, memory_bytes=expert_memory_bytes(p),
                                    load=requests_per_s * usage.usage.get(e.name, 0.0) * per_item_s,
                                    everywhere=e.name == spec.router.expert))
    edges = [Edge(upstream=w.upstream, downstream=w.downstream, weight=requests_per_s * w.probability)
             for w in usage.edges]
    return PlacementProblem(experts=experts, nodes=nodes, edges=edges, config=config or PlacementConfig(),
                            current=current or {})
