"""`expertmesh plan --explain`: a plan as text - per node its experts and where each starts (device, host memory, on
demand, its own deployment), the memory, the expert hosts with their predicted calls/s and switches/s, the cut
edges, the why."""

from __future__ import annotations

import json

from expertmesh.cluster.memory_model import NodePlan
from expertmesh.cluster.placement import Plan, PlacementProblem

MIB = 2 ** 20


def _tier(expert: str, x: NodePlan | None) -> str:
    if x is None:
        return ""
    if expert in x.dedicated:
        return ", dedicated"
    if expert in x.resident:
        return ", device"
    if expert in x.host:
        return ", host memory"
    if expert in x.on_demand:
        return ", on demand (disk)"
    return ""


def format_plan(plan: Plan, problem: PlacementProblem, *, explain: bool = True, title: str = "",
                executors: dict[str, NodePlan] | None = None) -> str:
    caps = {n.name: n.memory_bytes for n in problem.nodes}
    everywhere = {e.name for e in problem.experts if e.everywhere}
    degraded = sum(len(v) for v in plan.offloaded.values())
    lines = [f"{title}plan ({plan.method}): cut {plan.cut_weight:.3g} of {plan.total_weight:.3g} dependent calls/s "
             f"- {100 * plan.internal_share:.1f}% stay inside a node"
             + (f"; memory short: {degraded} home(s) off their device" if degraded else "")]
    for n in problem.nodes:
        held = [e for e, ns in plan.replicas.items() if n.name in ns]
        x = (executors or {}).get(n.name)
        lines.append(f"  {n.name:<10} memory {plan.memory_used_bytes[n.name] / MIB:7.1f} / {caps[n.name] / MIB:.1f} MiB"
                     f"   load {plan.load[n.name]:.3f}")
        for e in sorted(held, key=lambda e: (e not in everywhere, plan.homes[e] != n.name, e)):
            role = "every node" if e in everywhere else "home" if plan.homes[e] == n.name else "replica"
            lines.append(f"      {e:<24}{role}{'' if e in everywhere else _tier(e, x)}")
        if x is not None:
            if x.num_replicas:
                host = "no limit" if x.host_budget_bytes is None else f"{x.host_budget_bytes / MIB:.1f} MiB"
                lines.append(f"      expert hosts (pool): {x.num_replicas} replica(s), each {x.device_budget_bytes / MIB:.1f}"
                             f" MiB of experts on the device + {x.activation_reserve_bytes / MIB:.1f} MiB for a batch, "
                             f"host memory {host}")
                lines.append(f"        device: {', '.join(x.resident) or '-'}; host memory: {', '.join(x.host) or '-'}; "
                             f"on demand: {', '.join(x.on_demand) or '-'}")
                lines.append(f"        predicted: {x.predicted_calls_per_s:.0f} calls/s sustained, "
                             f"{x.predicted_switches_per_s:.2f} switches/s at the planned {x.planned_calls_per_s:.1f} "
                             f"calls/s ({100 * x.hit_share:.0f}% of them to experts starting on the device); arrange "
                             f"waits at most {x.max_wait_s:g} s"
                             + (f" - {x.reason}" if explain else ""))
            for e, d in sorted(x.dedicated.items()):
                lines.append(f"      dedicated {e}: {d.min_replicas}-{d.max_replicas} replica(s), "
                             f"{d.replica_bytes / MIB:.1f} MiB each" + (f" - {d.reason}" if explain else ""))
    if plan.cut_edges:
        lines.append("  cut edges (upstream -> downstream at node: calls/s):")
        for u, v, n, w in sorted(plan.cut_edges, key=lambda c: -c[3]):
            lines.append(f"      {u} -> {v} at {n}: {w:.3g}")
    else:
        lines.append("  cut edges: none")
    if explain:
        lines.append("  why:")
        lines += [f"      {e}: {why}" for e, why in plan.reasons.items()]
    return "\n".join(lines)


def plan_json(plan: Plan, executors: dict[str, NodePlan] | None = None) -> str:
    return json.dumps({"method": plan.method, "homes": plan.homes, "replicas": plan.replicas,
                       "executors": {n: x.to_json() for n, x in (executors or {}).items()},
                       "offloaded": plan.offloaded, "memory_used_bytes": plan.memory_used_bytes, "load": plan.load,
                       "cut_edges": [{"upstream": u, "downstream": v, "node": n, "weight": w} for u, v, n, w in plan.cut_edges],
                       "cut_weight": plan.cut_weight, "total_weight": plan.total_weight,
                       "miss_cost": plan.miss_cost}, indent=2)
