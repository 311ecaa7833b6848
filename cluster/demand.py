"""The placement problem of the CoEs a cluster serves: experts' memory and compute, edge weights from usage.

One CoE or several, planned together (`expertmesh serve --spec A --coe B`): each served CoE comes as a
`ServedCoE` - its spec in serving keys (`experts.revisions`: an expert byte-identical to one already served keeps
that expert's key, so it is placed and counted once), its share of the cluster's requests and its usage. The
joint usage is P(a request of the cluster invokes the expert) = sum over CoEs of share x P(the CoE's request
invokes it), and each dependency edge's weight likewise, so one plan co-locates every CoE's dependent experts.

memory = the weights (what a device holds while the expert is resident) and a batch's activations at the expert's
serving batch (the profile's largest useful batch: a node's pool keeps room for the largest of what it runs); compute
load = requests/s x P(invoked) x per-image time at that batch (core-seconds per second); edge weight = requests/s x
P(the dependent call happens); miss cost = what a home off its node's device costs (`miss_cost`: the switches its
calls make, as cut calls of the same busy time). Every CoE's router classifier runs in the router, on every node.
Per planned node, `executor_sizing` then decides the pooled hosts by the memory model (`cluster.memory_model`).

An expert the profile store has no current entry for (another CoE's, or a cluster the Helm chart started before
anyone profiled on it) is estimated from its checkpoint's header (`estimated_costs`): its weights, activations of
the profiled experts' median share of their weights, compute at their median seconds per weight byte. With no
profiled expert at all the constants below stand in: the planner only compares loads with one another, so the plan
still co-locates dependent experts within every node's memory.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from expertmesh.cluster.dedicate import DEFAULT_MIN_BUSY, split
from expertmesh.cluster.placement import Edge, ExpertDemand, NodeCapacity, Plan, PlacementConfig, PlacementProblem
from expertmesh.cluster.memory_model import NodeMemory, NodePlan, plan_node
from expertmesh.cluster.costs import ExpertCost
from expertmesh.errors import FailedPrecondition
from expertmesh.experts.spec import CoESpec
from expertmesh.profiler.serving_profiles import serving_batch
from expertmesh.profiler.store import EdgeWeight, ExpertProfile, UsageProfile

ACTIVATION_SHARE = 0.5  # without a profile: a batch's activations taken as half the weights again (profiled: 0.1-0.6)
SECONDS_PER_BYTE = 1e-9  # without a profile: compute proportional to bytes (only the ratio between experts matters)
HOP_MS = 2.0  # what a dependent call sent to another node costs (the router's extra round trip): a cut call's price
GROUP_WAIT_S = 0.5  # a switched-in expert's calls wait up to this long to run together (pool_max_wait_s)


def miss_cost(c: ExpertCost, calls_per_s: float) -> float:
    """A home off the device, priced as cut calls/s of the same busy time: its calls arrive in groups of at most its
    batch (what arrange gathers within GROUP_WAIT_S), each group a switch of the host -> device copy."""
    if calls_per_s <= 0:
        return 0.0
    group = min(c.batch_size, max(1.0, calls_per_s * GROUP_WAIT_S))
    switch_ms = c.switch_ms or c.disk_switch_ms or 1.0
    return calls_per_s / group * switch_ms / HOP_MS


@dataclass(frozen=True)
class ServedCoE:
    """One CoE as planning input."""

    spec: CoESpec  # in serving keys
    share: float  # relative share of the cluster's requests (> 0; the CoEs' shares are normalised)
    usage: UsageProfile  # in serving keys: the spec's expected mix, a profile's sample or observed traffic


def expert_cost(p: ExpertProfile) -> ExpertCost:
    """What a replica of the profiled expert holds and spends at its serving batch (no calls yet); a profile that is
    not a usable cost model is refused naming the expert, the value and the fix (`ExpertProfile.require_valid`)."""
    b = serving_batch(p.require_valid())
    return ExpertCost(name=p.expert, weights_bytes=p.footprint_bytes,
                      activation_bytes=max(0, b.peak_bytes - p.footprint_bytes),
                      k_ms_per_item=p.fit.k_ms_per_item, b_ms_per_batch=p.fit.b_ms, batch_size=b.batch_size,
                      switch_ms=p.move_ms("host", "device") or 0.0,
                      disk_switch_ms=(p.move_ms("disk", "host") or 0.0) + (p.move_ms("host", "device") or 0.0),
                      calls_per_s=0.0)


def memory_bytes(c: ExpertCost) -> int:
    return c.weights_bytes + c.activation_bytes


def per_item_s(c: ExpertCost) -> float:
    return (c.k_ms_per_item + c.b_ms_per_batch / c.batch_size) / 1000.0


def estimated_costs(weights_bytes: dict[str, int], batch_sizes: dict[str, int],
                    profiled: dict[str, ExpertCost]) -> dict[str, ExpertCost]:
    """Costs of unprofiled experts (name -> checkpoint weight bytes) scaled from the profiled ones: activations at
    their median share of the weights, time per image at their median seconds per weight byte."""
    known = [c for c in profiled.values() if c.weights_bytes > 0]
    share = statistics.median(c.activation_bytes / c.weights_bytes for c in known) if known else ACTIVATION_SHARE
    s_per_byte = statistics.median(per_item_s(c) / c.weights_bytes for c in known) if known else SECONDS_PER_BYTE
    return {name: ExpertCost(name=name, weights_bytes=w, activation_bytes=int(w * share),
                             k_ms_per_item=1000.0 * w * s_per_byte, b_ms_per_batch=0.0,
                             batch_size=batch_sizes.get(name, 1), switch_ms=0.0, calls_per_s=0.0)
            for name, w in weights_bytes.items()}


def joint_usage(coes: list[ServedCoE]) -> UsageProfile:
    """P(a request of the cluster invokes each expert) and each edge's P, mixing the CoEs by their shares."""
    total = sum(c.share for c in coes)
    if not coes or total <= 0:
        raise ValueError(f"joint usage of {len(coes)} CoEs with total share {total}: give at least one a share > 0")
    usage: dict[str, float] = {}
    edges: dict[tuple[str, str, str], float] = {}
    for c in coes:
        w = c.share / total
        for e, p in c.usage.usage.items():
            usage[e] = usage.get(e, 0.0) + w * p
        for e in c.usage.edges:
            k = (e.upstream, e.downstream, e.kind)
            edges[k] = edges.get(k, 0.0) + w * e.probability
    source = coes[0].usage.source if all(c.usage.source == coes[0].usage.source for c in coes) else "spec"
    return UsageProfile(source=source, num_requests=sum(c.usage.num_requests for c in coes),
                        usage={e: min(1.0, p) for e, p in sorted(usage.items())},
                        edges=[EdgeWeight(upstream=u, downstream=d, kind=k, probability=min(1.0, p))
                               for (u, d, k), p in sorted(edges.items())])


def routers(coes: list[ServedCoE]) -> set[str]:
    """The router classifiers' keys: they run in the router, on every node."""
    return {c.spec.router.expert for c in coes}


def joint_problem(coes: list[ServedCoE], costs: dict[str, ExpertCost], nodes: list[NodeCapacity],
                  requests_per_s: float, config: PlacementConfig | None = None,
                  current: dict[str, list[str]] | None = None, usage: UsageProfile | None = None) -> PlacementProblem:
    """The placement problem of every served CoE's experts (each key once) on `nodes`. `usage`: the joint usage to
    plan with (default `joint_usage(coes)`; observed traffic at a drift re-plan); `costs`: every key's."""
    usage = usage or joint_usage(coes)
    keys = list(dict.fromkeys(e.name for c in coes for e in c.spec.experts))
    missing = [k for k in keys if k not in costs]
    if missing:
        raise FailedPrecondition(f"no cost for {', '.join(missing)}", field="profile",
                                 fix="run `expertmesh profile` (placement needs each expert's memory and speed)")
    everywhere = routers(coes)
    experts = []
    for k in keys:
        calls = requests_per_s * usage.usage.get(k, 0.0)
        experts.append(ExpertDemand(name=k, memory_bytes=costs[k].weights_bytes if k not in everywhere
                                    else memory_bytes(costs[k]), activation_bytes=costs[k].activation_bytes,
                                    load=calls * per_item_s(costs[k]), everywhere=k in everywhere,
                                    miss_cost=miss_cost(costs[k], calls)))
    edges = [Edge(upstream=w.upstream, downstream=w.downstream, weight=requests_per_s * w.probability)
             for w in usage.edges]
    return PlacementProblem(experts=experts, nodes=nodes, edges=edges, config=config or PlacementConfig(),
                            current=current or {})


def require_profiles(spec: CoESpec, profiles: dict[str, ExpertProfile]) -> None:
    """FailedPrecondition naming every expert of `spec` without a current profile entry."""
    missing = [e.name for e in spec.experts if e.name not in profiles]
    if missing:
        raise FailedPrecondition(f"no current profile for {', '.join(missing)}", field="profile",
                                 fix="run `expertmesh profile` (placement needs each expert's memory and speed)")


def placement_problem(spec: CoESpec, profiles: dict[str, ExpertProfile], usage: UsageProfile,
                      nodes: list[NodeCapacity], requests_per_s: float,
                      config: PlacementConfig | None = None,
                      current: dict[str, list[str]] | None = None) -> PlacementProblem:
    """One CoE's problem from its profile, which must cover every expert."""
    require_profiles(spec, profiles)
    costs = {e.name: expert_cost(profiles[e.name]) for e in spec.experts}
    return joint_problem([ServedCoE(spec, 1.0, usage)], costs, nodes, requests_per_s, config, current, usage)


def node_memory(node: NodeCapacity, pool_memory_bytes: int, compute_slots: float) -> NodeMemory:
    """What a planned node offers its pool: the memory the dedicated deployments left, host memory as the host replica
    takes it (`experts.residency.memory_budget_bytes`: on a CPU node as much as the device budget, on a GPU node the
    machine's, unbounded here), its compute slots; a CPU's switch copies with the cores that infer."""
    cpu = node.gpus <= 0
    host = node.host_memory_bytes if node.host_memory_bytes is not None else (pool_memory_bytes if cpu else None)
    return NodeMemory(device_bytes=pool_memory_bytes, host_bytes=host, compute_slots=compute_slots,
                      loads_use_compute=cpu)


def executor_sizing(coes: list[ServedCoE], costs: dict[str, ExpertCost], usage: UsageProfile,
                    nodes: list[NodeCapacity], requests_per_s: float, result: Plan, host_num_cpus: float = 1.0,
                    torch_threads: int = 1, dedicate_min_busy: float = DEFAULT_MIN_BUSY,
                    components_per_request: int = 1) -> dict[str, NodePlan]:
    """Per planned node, which experts get a dedicated deployment (`cluster.dedicate`) and its pooled hosts on what is
    left (`cluster.memory_model.plan_node`: executors, each one's device and host budgets, which experts start on the
    device, in host memory or on disk, and the calls/s and switches/s that predicts), from the costs (by key), the calls
    the plan puts there (an expert held on n nodes: 1/n of its calls on each) and the dependency edges between the
    node's experts (`usage`: the joint usage planned with). The router classifiers run in the router, not in a host.
    A node runs at most cpus / host_num_cpus replicas (what Ray can place)."""
    in_routers = routers(coes)
    in_router_bytes = sum(memory_bytes(costs[e]) for e in in_routers if e in costs)  # every node holds them
    out = {}
    for node in nodes:
        held = [e for e, ns in result.replicas.items() if node.name in ns and e not in in_routers and e in costs]
        if not held:
            continue
        placed = [costs[e].model_copy(update={
            "name": e, "calls_per_s": requests_per_s * usage.usage.get(e, 0.0) / len(result.replicas[e])}) for e in held]
        slots = node.cpus / torch_threads if node.cpus > 0 else 1.0
        max_replicas = max(1, int(node.cpus // host_num_cpus)) if node.cpus > 0 else 1
        parts = split(placed, max(0, node.memory_bytes - in_router_bytes), min(slots, max_replicas), dedicate_min_busy)
        if parts.pooled:
            names = {e.name for e in parts.pooled}
            edges = {(w.upstream, w.downstream): requests_per_s * w.probability / len(result.replicas[w.upstream])
                     for w in usage.edges if w.kind == "dependency" and w.upstream in names and w.downstream in names}
            pool = plan_node(parts.pooled, edges, node_memory(node, parts.pool_memory_bytes, parts.pool_compute_slots),
                             max_replicas=max(1, int(min(max_replicas, parts.pool_compute_slots))),
                             components_per_request=components_per_request)
        else:
            pool = NodePlan(0, 0, None, 0, (), (), (), 0.0, 0.0, 0.0, 1.0,
                            "no pool: every expert here has its own deployment")
        out[node.name] = replace(pool, dedicated=parts.dedicated)
    return out
