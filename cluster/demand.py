"""The placement problem of a spec: experts' memory and compute from the profile, edge weights from usage.

memory = weights + peak activations at the expert's serving batch (the profile's largest useful
batch); compute load = requests/s x P(invoked) x per-image time at that batch (core-seconds per
second); edge weight = requests/s x P(the dependent call happens). The router's classifier is
needed by every request, so it gets a replica on every node.

Without a profile (a cluster the Helm chart started, before anyone profiled on it), `checkpoint_problem`
takes each expert's memory from its checkpoint's header and its compute as proportional to those bytes:
the planner only compares loads with one another, so the constant does not matter, and the plan still
co-locates dependent experts within every node's memory.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from expertmesh.cluster.dedicate import DEFAULT_MIN_BUSY, split
from expertmesh.cluster.placement import Edge, ExpertDemand, NodeCapacity, Plan, PlacementConfig, PlacementProblem
from expertmesh.cluster.sizing import ExecutorSizing, ExpertCost, size_executors
from expertmesh.errors import FailedPrecondition
from expertmesh.experts.checkpoint_header import WEIGHTS_FILE, checkpoint_bytes
from expertmesh.experts.spec import CoESpec, resolve_checkpoint
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
    return _problem(experts, usage, nodes, requests_per_s, config, current)


def _problem(experts: list[ExpertDemand], usage: UsageProfile, nodes: list[NodeCapacity], requests_per_s: float,
             config: PlacementConfig | None, current: dict[str, list[str]] | None) -> PlacementProblem:
    """The problem of `experts` on `nodes`, with the usage's dependency edges in calls per second."""
    edges = [Edge(upstream=w.upstream, downstream=w.downstream, weight=requests_per_s * w.probability)
             for w in usage.edges]
    return PlacementProblem(experts=experts, nodes=nodes, edges=edges, config=config or PlacementConfig(),
                            current=current or {})


ACTIVATION_SHARE = 0.5  # without a profile: a batch's activations taken as half the weights again (profiled: 0.1-0.6)
SECONDS_PER_BYTE = 1e-9  # without a profile: compute proportional to bytes (only the ratio between experts matters)


def checkpoint_problem(spec: CoESpec, zoo_root: Path, usage: UsageProfile, nodes: list[NodeCapacity],
                       requests_per_s: float, config: PlacementConfig | None = None,
                       current: dict[str, list[str]] | None = None) -> PlacementProblem:
    """The placement problem without a profile: memory from each checkpoint's header (plus ACTIVATION_SHARE),
    compute proportional to it; edges from `usage` as with a profile."""
    experts = []
    for e in spec.experts:
        weights = checkpoint_bytes(resolve_checkpoint(e, zoo_root) / WEIGHTS_FILE)
        experts.append(ExpertDemand(name=e.name, memory_bytes=int(weights * (1 + ACTIVATION_SHARE)),
                                    load=requests_per_s * usage.usage.get(e.name, 0.0) * weights * SECONDS_PER_BYTE,
                                    everywhere=e.name == spec.router.expert))
    return _problem(experts, usage, nodes, requests_per_s, config, current)


def executor_sizing(spec: CoESpec, profiles: dict[str, ExpertProfile], usage: UsageProfile, nodes: list[NodeCapacity],
                    requests_per_s: float, result: Plan, host_num_cpus: float = 1.0,
                    torch_threads: int = 1, dedicate_min_busy: float = DEFAULT_MIN_BUSY) -> dict[str, ExecutorSizing]:
    """Per planned node, which experts get a dedicated deployment (`cluster.dedicate`) and its pooled hosts' replica
    count and device budget on what is left (`cluster.sizing`), from the profile and the calls the plan puts there
    (an expert held on n nodes: 1/n of its calls on each). The router's classifier runs in the router, not in a
    host. A node runs at most cpus / host_num_cpus replicas (what Ray can place); a pool of no experts, 0."""
    out = {}
    for node in nodes:
        held = [e for e, ns in result.replicas.items() if node.name in ns and e != spec.router.expert and e in profiles]
        if not held:
            continue
        costs = []
        for name in held:
            p = profiles[name]
            b = serving_batch(p)
            costs.append(ExpertCost(
                name=name, weights_bytes=p.footprint_bytes, activation_bytes=max(0, b.peak_bytes - p.footprint_bytes),
                k_ms_per_item=p.fit.k_ms_per_item, b_ms_per_batch=p.fit.b_ms, batch_size=b.batch_size,
                switch_ms=p.move_ms("host", "device") or 0.0,
                calls_per_s=requests_per_s * usage.usage.get(name, 0.0) / len(result.replicas[name])))
        slots = node.cpus / torch_threads if node.cpus > 0 else 1.0
        max_replicas = max(1, int(node.cpus // host_num_cpus)) if node.cpus > 0 else 1
        parts = split(costs, node.memory_bytes, min(slots, max_replicas), dedicate_min_busy)
        if parts.pooled:
            pool = size_executors(parts.pooled, parts.pool_memory_bytes, parts.pool_compute_slots,
                                  max_replicas=max(1, int(min(max_replicas, parts.pool_compute_slots))))
        else:
            pool = ExecutorSizing(0, 0, 0, 0.0, 1.0, "no pool: every expert here has its own deployment")
        out[node.name] = replace(pool, dedicated=parts.dedicated)
    return out
