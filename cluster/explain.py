"""`expertmesh plan --explain`: a plan as text - per node its experts, memory and expert-host sizing, the cut edges,
the why."""

from __future__ import annotations

import json

from expertmesh.cluster.placement import Plan, PlacementProblem
from expertmesh.cluster.sizing import ExecutorSizing

MIB = 2 ** 20


def format_plan(plan: Plan, problem: PlacementProblem, *, explain: bool = True, title: str = "",
                executors: dict[str, ExecutorSizing] | None = None) -> str:
    caps = {n.name: n.memory_bytes for n in problem.nodes}
    everywhere = {e.name for e in problem.experts if e.everywhere}
    lines = [f"{title}plan ({plan.method}): cut {plan.cut_weight:.3g} of {plan.total_weight:.3g} dependent calls/s "
             f"- {100 * plan.internal_share:.1f}% stay inside a node"]
    for n in problem.nodes:
        held = [e for e, ns in plan.replicas.items() if n.name in ns]
        lines.append(f"  {n.name:<10} memory {plan.memory_used_bytes[n.name] / MIB:7.1f} / {caps[n.name] / MIB:.1f} MiB"
                     f"   load {plan.load[n.name]:.3f}")
        x = (executors or {}).get(n.name)
        for e in sorted(held, key=lambda e: (e not in everywhere, plan.homes[e] != n.name, e)):
            role = "every node" if e in everywhere else "home" if plan.homes[e] == n.name else "replica"
            served = "" if e in everywhere or x is None else ", dedicated" if e in x.dedicated else ", pooled"
            lines.append(f"      {e:<24}{role}{served}")
        if x is not None:
            if x.num_replicas:
                lines.append(f"      expert hosts (pool): {x.num_replicas} replica(s), {x.device_budget_bytes / MIB:.1f} "
                             f"MiB of experts + {x.activation_reserve_bytes / MIB:.1f} MiB for a batch each"
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


def plan_json(plan: Plan, executors: dict[str, ExecutorSizing] | None = None) -> str:
    return json.dumps({"method": plan.method, "homes": plan.homes, "replicas": plan.replicas,
                       "executors": {n: x.to_json() for n, x in (executors or {}).items()},
                       "memory_used_bytes": plan.memory_used_bytes, "load": plan.load,
                       "cut_edges": [{"upstream": u, "downstream": v, "node": n, "weight": w} for u, v, n, w in plan.cut_edges],
                       "cut_weight": plan.cut_weight, "total_weight": plan.total_weight}, indent=2)
