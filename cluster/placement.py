"""The placement planner: which node(s) hold each expert, so dependent experts share a node.

Pure: `plan(problem)` takes a `PlacementProblem` (experts with memory and compute demand, weighted
dependency edges in calls per second, nodes with memory capacity) and returns a `Plan`; the same
inputs give the same plan. Every expert has one *home* node; an expert may get extra replicas on
other nodes (a shared downstream expert next to each of its upstreams) when memory allows. An edge
u -> v is *cut* on node n when u's home is n and v has no replica there.

Memory is a tier, not a wall: a node's pooled hosts hold on the device what fits its memory and load the rest
from host memory or disk when called (`cluster.memory_model` decides how, per node). So the plan says, besides
where each expert lives, which homes the device holds (`resident`); an extra replica is only worth its memory on
the device. The objective is the least cut weight plus, for each home the device does not hold, its `miss_cost`
(the calls/s-equivalent of the switches it will make: `cluster.demand`), subject to the device memory of each node
and a load-balance bound on compute, then the least memory. When every expert fits, every home is resident and the
plan is the least-cut placement; when memory is short (a node lost, a smaller budget) the plan degrades - the
least costly experts leave the device - instead of failing. Only an expert larger than every node's memory cannot be
served, and is refused by name.

Small instances are solved exactly (a MILP, HiGHS through scipy); large ones by a graph heuristic
(heaviest edges merged first, then first-fit onto nodes, then replicas of cut downstream experts).
`optimality_gap` compares the two where the exact answer is known.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from expertmesh.cluster.placement_heuristic import solve_heuristic
from expertmesh.cluster.placement_problem import (Edge, ExpertDemand, NodeCapacity, Plan, PlacementConfig,  # noqa: F401
                                                  PlacementProblem, Solved, balance_bound, device_capacity,
                                                  merged_edges, miss_costs, node_bytes)
from expertmesh.errors import FailedPrecondition, InvalidArgument

__all__ = ["Edge", "ExpertDemand", "NodeCapacity", "Plan", "PlacementConfig", "PlacementProblem", "plan",
           "evaluate", "optimality_gap", "brute_force_cut", "node_bytes"]


# ---------------------------------------------------------------------------------------------- checks
def _check(p: PlacementProblem) -> None:
    names = [e.name for e in p.experts]
    if len(set(names)) != len(names):
        raise InvalidArgument("duplicate expert names in the placement problem", field="experts", fix="name each once")
    if not p.nodes:
        raise InvalidArgument("no nodes to place experts on", field="nodes", fix="start the cluster (expertmesh up)")
    known = set(names)
    for e in p.edges:
        for end in (e.upstream, e.downstream):
            if end not in known:
                raise InvalidArgument(f"edge {e.upstream} -> {e.downstream} names unknown expert {end!r}", field="edges",
                                      fix="build edges from the same spec as the experts")
    biggest = max(device_capacity(p, n) for n in p.nodes)
    for e in p.experts:
        if e.memory_bytes + e.activation_bytes > biggest and not e.everywhere:
            raise FailedPrecondition(
                f"expert {e.name!r} needs {(e.memory_bytes + e.activation_bytes) / 2**20:.1f} MiB (weights and a batch's "
                f"activations), more "
                f"than any node's device offers ({biggest / 2**20:.1f} MiB): it cannot be served at all",
                field="memory", fix="add a node with more memory or shrink its batch size")


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(p: PlacementProblem, homes: dict[str, str], replicas: dict[str, set[str]], method: str,
             offloaded: set[str] | None = None) -> Plan:
    """The plan's figures; `offloaded`: homes their node's device does not hold (none: every one is held)."""
    node_names = [n.name for n in p.nodes]
    by_name = {e.name: e for e in p.experts}
    offloaded = set(offloaded or ()) - {e.name for e in p.experts if e.everywhere}
    everywhere = sum(e.memory_bytes for e in p.experts if e.everywhere)
    mem = {}
    for n in node_names:
        held = [e for e, ns in replicas.items() if n in ns and not by_name[e].everywhere]
        mem[n] = everywhere + node_bytes(by_name, held, [e for e in held if not (e in offloaded and homes[e] == n)])
    load = {n: sum(by_name[e].load for e, h in sorted(homes.items()) if h == n and not by_name[e].everywhere)
            for n in node_names}  # summed in name order: the same figures whatever order homes were found in
    edges = merged_edges(p)
    cut = []
    for (u, v), w in edges.items():
        if by_name[u].everywhere:  # traffic of an everywhere-expert runs where the downstream is: never cut
            continue
        if homes[u] not in replicas[v]:
            cut.append((u, v, homes[u], w))
    ordered = {e: sorted(replicas[e], key=lambda n: (n != homes[e], node_names.index(n))) for e in sorted(replicas)}
    return Plan(homes=dict(sorted(homes.items())), replicas=ordered, memory_used_bytes=mem, load=load, cut_edges=cut,
                cut_weight=sum(c[3] for c in cut), total_weight=sum(w for (u, _), w in edges.items()
                                                                       if not by_name[u].everywhere),
                method=method, reasons=_reasons(p, homes, replicas, cut, offloaded),
                moved=sorted(e for e, ns in p.current.items() if e in replicas and replicas[e] - set(ns)),
                offloaded={n: sorted(e for e in offloaded if homes[e] == n) for n in node_names
                           if any(homes[e] == n for e in offloaded)},
                miss_cost=sum(miss_costs(p)[e] for e in offloaded))


def _reasons(p: PlacementProblem, homes: dict[str, str], replicas: dict[str, set[str]], cut,
             offloaded: set[str] = frozenset()) -> dict[str, str]:
    edges = merged_edges(p)
    by_name = {e.name: e for e in p.experts}
    out = {}
    for e in sorted(homes):
        if by_name[e].everywhere:
            out[e] = "needed by every request: a replica on every node"
            continue
        together, apart = [], []
        for (u, v), w in sorted(edges.items(), key=lambda kv: (-kv[1], kv[0])):
            if e not in (u, v) or by_name[u].everywhere:
                continue
            other = v if u == e else u
            inside = homes[u] in replicas[v]  # the call leaves u's home only if v has no replica there
            (together if inside else apart).append(f"{other} ({w:.3g})")
        partners = together + apart
        text = f"home {homes[e]}"
        if len(replicas[e]) > 1:
            text += f", extra replicas on {', '.join(sorted(replicas[e] - {homes[e]}))} next to its upstream experts"
        if together:
            text += f"; with its dependents/upstreams {', '.join(together)}"
        if apart:
            text += f"; apart from {', '.join(apart)} (memory or balance)"
        if not partners:
            text += "; no dependencies: placed for memory and balance"
        if e in offloaded:
            text += (f"; its node's device memory is short: held in host memory or loaded on demand (costs "
                     f"{miss_costs(p)[e]:.3g} calls/s-equivalent, the least of what could leave)")
        out[e] = text
    return out


# ---------------------------------------------------------------------------------------------- exact
@dataclass(frozen=True)
class _MilpLayout:
    """Where each variable sits in the MILP's vector: h[e,n] (home), x[e,n] (replica), d[e,n] (held on the device),
    c[k,n] (edge k cut at node n), then continuous ones: a[n] (the activation reserve of node n's pool) and the
    busiest node's load."""

    num_experts: int
    num_nodes: int
    num_edges: int

    @property
    def num_vars(self) -> int:
        return 3 * self.num_experts * self.num_nodes + self.num_edges * self.num_nodes + self.num_nodes + 1

    @property
    def lmax(self) -> int:
        return self.num_vars - 1

    def a(self, n: int) -> int:
        return self.num_vars - 1 - self.num_nodes + n

    def h(self, e: int, n: int) -> int:
        return e * self.num_nodes + n

    def x(self, e: int, n: int) -> int:
        return self.num_experts * self.num_nodes + e * self.num_nodes + n

    def d(self, e: int, n: int) -> int:
        return 2 * self.num_experts * self.num_nodes + e * self.num_nodes + n

    def c(self, k: int, n: int) -> int:
        return 3 * self.num_experts * self.num_nodes + k * self.num_nodes + n


@dataclass
class _Rows:
    """Linear constraints lower <= row . v <= upper, one row at a time."""

    num_vars: int
    rows: list[np.ndarray] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)

    def add(self, coefs: dict[int, float], lower: float, upper: float) -> None:
        row = np.zeros(self.num_vars)
        for j, v in coefs.items():
            row[j] += v
        self.rows.append(row)
        self.lower.append(lower)
        self.upper.append(upper)


def _milp_cost(p: PlacementProblem, lay: _MilpLayout, edges: list[tuple[str, str, float]]) -> np.ndarray:
    """Cut weight and the miss cost of homes off the device, plus the tie-breaks: device memory used, replicas the
    current placement lacks, the busiest node."""
    experts, nodes = p.experts, [n.name for n in p.nodes]
    cost = np.zeros(lay.num_vars)
    mib = 2.0 ** 20
    miss = miss_costs(p)
    for i, e in enumerate(experts):
        for n in range(lay.num_nodes):
            if e.everywhere:
                continue
            cost[lay.d(i, n)] = p.config.memory_tiebreak * e.memory_bytes / mib - miss[e.name]
            cost[lay.x(i, n)] = miss[e.name]  # x - d = 1 only for a home off the device
            if e.name in p.current and nodes[n] not in p.current[e.name]:
                cost[lay.x(i, n)] += p.config.move_penalty
    for n in range(lay.num_nodes):
        cost[lay.a(n)] = p.config.memory_tiebreak / mib
    total_load = sum(e.load for e in experts if not e.everywhere)
    if total_load > 0:
        cost[lay.lmax] = p.config.balance_tiebreak / total_load
    by_name = {e.name: e for e in experts}
    for k, (u, _, w) in enumerate(edges):
        for n in range(lay.num_nodes):
            cost[lay.c(k, n)] = 0.0 if by_name[u].everywhere else w
    return cost


def _milp_constraints(p: PlacementProblem, lay: _MilpLayout, edges: list[tuple[str, str, float]]) -> _Rows:
    experts = p.experts
    nn = lay.num_nodes
    rows = _Rows(lay.num_vars)
    for i, e in enumerate(experts):
        rows.add({lay.h(i, n): 1.0 for n in range(nn)}, 1, 1)  # one home
        for n in range(nn):
            rows.add({lay.x(i, n): 1.0, lay.h(i, n): -1.0}, 0, np.inf)  # home holds a replica
            rows.add({lay.x(i, n): 1.0, lay.d(i, n): -1.0}, 0, np.inf)  # on the device only where held
            if e.everywhere:
                rows.add({lay.x(i, n): 1.0}, 1, 1)
                rows.add({lay.d(i, n): 1.0}, 0, 0)  # in the router, counted apart (_device_capacity)
            elif e.memory_bytes + e.activation_bytes > device_capacity(p, p.nodes[n]):  # its pool could never load it
                rows.add({lay.x(i, n): 1.0}, 0, 0)
            else:
                # a replica beside its home is only worth its memory on the device: x - h <= d
                rows.add({lay.x(i, n): 1.0, lay.h(i, n): -1.0, lay.d(i, n): -1.0}, -np.inf, 0)
                if not p.config.allow_replicas:
                    rows.add({lay.x(i, n): 1.0, lay.h(i, n): -1.0}, 0, 0)
    total_load = sum(e.load for e in experts if not e.everywhere)
    bound = balance_bound(p)
    for n, node in enumerate(p.nodes):
        rows.add({**{lay.d(i, n): float(e.memory_bytes) for i, e in enumerate(experts) if not e.everywhere},
                  lay.a(n): 1.0}, 0, float(device_capacity(p, node)))
        for i, e in enumerate(experts):  # the reserve holds the largest batch of what the pool may run
            if e.activation_bytes and not e.everywhere:
                rows.add({lay.a(n): 1.0, lay.x(i, n): -float(e.activation_bytes)}, 0, np.inf)
        node_load = {lay.h(i, n): e.load for i, e in enumerate(experts) if not e.everywhere}
        if np.isfinite(bound):
            rows.add(node_load, 0, bound)
        if total_load > 0:  # lmax >= this node's load: spreads work when the cut does not decide
            rows.add({**node_load, lay.lmax: -1.0}, -np.inf, 0)
    idx = {e.name: i for i, e in enumerate(experts)}
    for k, (u, v, _) in enumerate(edges):
        for n in range(nn):
            rows.add({lay.c(k, n): 1.0, lay.h(idx[u], n): -1.0, lay.x(idx[v], n): 1.0}, 0, np.inf)  # c >= h_u - x_v
    return rows




def _solve_exact(p: PlacementProblem) -> Solved | None:
    nodes = [n.name for n in p.nodes]
    edges = [(u, v, w) for (u, v), w in merged_edges(p).items()]
    lay = _MilpLayout(len(p.experts), len(nodes), len(edges))
    rows = _milp_constraints(p, lay, edges)
    integrality = np.ones(lay.num_vars)
    upper = np.ones(lay.num_vars)
    for j in [lay.lmax] + [lay.a(n) for n in range(lay.num_nodes)]:
        integrality[j], upper[j] = 0, np.inf
    res = milp(_milp_cost(p, lay, edges), constraints=LinearConstraint(np.array(rows.rows), rows.lower, rows.upper),
               integrality=integrality, bounds=Bounds(0, upper),
               options={"time_limit": p.config.time_limit_s, "disp": False})
    if res.x is None:
        return None
    sol = np.round(res.x).astype(int)
    homes = {e.name: nodes[next(n for n in range(lay.num_nodes) if sol[lay.h(i, n)])] for i, e in enumerate(p.experts)}
    replicas = {e.name: {nodes[n] for n in range(lay.num_nodes) if sol[lay.x(i, n)]} for i, e in enumerate(p.experts)}
    offloaded = {e.name for i, e in enumerate(p.experts) if not e.everywhere
                 and not sol[lay.d(i, nodes.index(homes[e.name]))]}
    return homes, replicas, offloaded


# ---------------------------------------------------------------------------------------------- entry points
def plan(problem: PlacementProblem, method: str = "auto") -> Plan:
    """The placement for `problem`: exact when small enough (or asked), else the heuristic."""
    _check(problem)
    nvar = len(problem.experts) * len(problem.nodes) * 3 + len(merged_edges(problem)) * len(problem.nodes)
    use_exact = method == "exact" or (method == "auto" and nvar <= problem.config.exact_max_variables)
    if method not in ("auto", "exact", "heuristic"):
        raise InvalidArgument(f"unknown method {method!r}", field="method", fix="use auto, exact or heuristic")
    solved = _solve_exact(problem) if use_exact else solve_heuristic(problem)
    if solved is None:
        raise FailedPrecondition("no placement satisfies the balance bound (every node's pool able to load what it is "
                                 "given)", field="nodes", fix="add nodes or memory, or raise balance_slack")
    homes, replicas, offloaded = solved
    return evaluate(problem, homes, replicas, "exact" if use_exact else "heuristic", offloaded)


def optimality_gap(problem: PlacementProblem) -> tuple[Plan, Plan, float]:
    """(exact, heuristic, gap): gap = heuristic cut weight minus exact, as a share of all dependency weight."""
    exact, heur = plan(problem, "exact"), plan(problem, "heuristic")
    total = exact.total_weight or 1.0
    return exact, heur, (heur.cut_weight - exact.cut_weight) / total


def brute_force_cut(problem: PlacementProblem) -> float:
    """The least cut weight by enumeration (no replicas, tiny instances only): the tests' ground truth."""
    _check(problem)
    movable = [e for e in problem.experts if not e.everywhere]
    nodes = [n.name for n in problem.nodes]
    best = float("inf")
    bound = balance_bound(problem)
    base = {n.name: sum(e.memory_bytes for e in problem.experts if e.everywhere) for n in problem.nodes}
    caps = {n.name: n.memory_bytes for n in problem.nodes}
    for combo in itertools.product(nodes, repeat=len(movable)):
        mem, ld, act = dict(base), {n: 0.0 for n in nodes}, {n: 0 for n in nodes}
        for e, n in zip(movable, combo):
            mem[n] += e.memory_bytes
            act[n] = max(act[n], e.activation_bytes)
            ld[n] += e.load
        mem = {n: mem[n] + act[n] for n in nodes}
        if any(mem[n] > caps[n] or ld[n] > bound for n in nodes):
            continue
        homes = dict(zip((e.name for e in movable), combo))
        cut = sum(w for (u, v), w in merged_edges(problem).items() if u in homes and v in homes and homes[u] != homes[v])
        best = min(best, cut)
    return best
