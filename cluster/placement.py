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
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import Bounds, LinearConstraint, milp

from expertmesh.errors import FailedPrecondition, InvalidArgument


class ExpertDemand(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    memory_bytes: int = Field(ge=0, description="its weights: what the device holds while it is resident")
    activation_bytes: int = Field(0, ge=0, description="a batch's activations at its serving batch: a node's pool "
                                                       "keeps room for the largest batch of what it may run")
    load: float = Field(0.0, ge=0, description="compute demand, e.g. core-seconds per second")
    everywhere: bool = Field(False, description="a replica on every node (the router's classifier)")
    miss_cost: float | None = Field(None, ge=0, description="cost of a home whose device does not hold it, in the cut "
                                                           "weight's unit (calls/s): the switches it will make; None: "
                                                           "more than any cut (kept on the device whenever it fits)")


class NodeCapacity(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    memory_bytes: int = Field(gt=0)
    labels: dict[str, str] = Field(default_factory=dict)
    cpus: float = Field(0.0, ge=0, description="logical CPUs (executor sizing's compute slots); 0: not known")
    gpus: float = Field(0.0, ge=0, description="GPUs: with none, the device is host memory and a switch a copy on "
                                               "the CPU")
    host_memory_bytes: int | None = Field(None, ge=0, description="host memory for copies of the weights; None: as "
                                                                  "much as the device on a CPU node, unbounded on a GPU "
                                                                  "node (the host replica's own rule)")


class Edge(BaseModel):
    model_config = ConfigDict(frozen=True)

    upstream: str
    downstream: str
    weight: float = Field(ge=0, description="dependent calls per second (or per request)")


class PlacementConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    balance_slack: float = Field(0.25, ge=0, description="a node's compute load may exceed the mean by this share "
                                                        "(plus the largest single expert)")
    allow_replicas: bool = True
    exact_max_variables: int = Field(600, ge=1, description="instances up to this many binaries are solved exactly")
    time_limit_s: float = Field(20.0, gt=0)
    memory_tiebreak: float = Field(1e-6, ge=0, description="weight of memory used in the objective, per MiB")
    balance_tiebreak: float = Field(1e-3, ge=0, description="weight of the busiest node's share of all load")
    move_penalty: float = Field(0.01, ge=0, description="cost (in cut calls/s) of a replica on a node the current "
                                                       "placement does not have it on: re-plans move few experts")


class PlacementProblem(BaseModel):
    model_config = ConfigDict(frozen=True)

    experts: list[ExpertDemand]
    nodes: list[NodeCapacity]
    edges: list[Edge]
    config: PlacementConfig = Field(default_factory=PlacementConfig)
    current: dict[str, list[str]] = Field(default_factory=dict, description="the placement running now (expert -> "
                                                                            "nodes), when re-planning")


@dataclass
class Plan:
    homes: dict[str, str]  # expert -> home node
    replicas: dict[str, list[str]]  # expert -> every node holding it (home first)
    memory_used_bytes: dict[str, int]
    load: dict[str, float]
    cut_edges: list[tuple[str, str, str, float]]  # (upstream, downstream, node where the call leaves, weight)
    cut_weight: float
    total_weight: float
    method: str
    reasons: dict[str, str] = field(default_factory=dict)
    moved: list[str] = field(default_factory=list)  # experts given a node the current placement does not have them on
    offloaded: dict[str, list[str]] = field(default_factory=dict)  # node -> homes its device does not hold
    miss_cost: float = 0.0  # the offloaded homes' summed miss cost
    executors: dict[str, dict] = field(default_factory=dict)  # node -> its pooled hosts (memory model), when sized

    @property
    def internal_share(self) -> float:
        return 1.0 - self.cut_weight / self.total_weight if self.total_weight > 0 else 1.0


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
    biggest = max(_device_capacity(p, n) for n in p.nodes)
    for e in p.experts:
        if e.memory_bytes + e.activation_bytes > biggest and not e.everywhere:
            raise FailedPrecondition(
                f"expert {e.name!r} needs {(e.memory_bytes + e.activation_bytes) / 2**20:.1f} MiB (weights and a batch's "
                f"activations), more "
                f"than any node's device offers ({biggest / 2**20:.1f} MiB): it cannot be served at all",
                field="memory", fix="add a node with more memory or shrink its batch size")


def _miss_costs(p: PlacementProblem) -> dict[str, float]:
    """Each expert's miss cost; an unknown one is more than every cut together, so memory decides it alone."""
    unknown = 1.0 + sum(e.weight for e in p.edges)
    return {e.name: unknown if e.miss_cost is None else e.miss_cost for e in p.experts}


def _device_capacity(p: PlacementProblem, node: NodeCapacity) -> int:
    """A node's memory for movable experts: what the every-node experts (in the router) leave."""
    return max(0, node.memory_bytes - sum(e.memory_bytes for e in p.experts if e.everywhere))


def node_bytes(by_name: dict[str, ExpertDemand], held: set[str] | list[str], resident: set[str] | list[str]) -> int:
    """What a node's pool needs on its device: the weights of the experts it holds there, and room for the largest
    batch's activations among every expert it may run (one batch at a time per executor)."""
    return (sum(by_name[e].memory_bytes for e in resident)
            + max((by_name[e].activation_bytes for e in held), default=0))


def _balance_bound(p: PlacementProblem) -> float:
    movable = [e.load for e in p.experts if not e.everywhere]
    if not movable or sum(movable) == 0:
        return float("inf")
    return (1.0 + p.config.balance_slack) * sum(movable) / len(p.nodes) + max(movable)


def _merged_edges(p: PlacementProblem) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for e in p.edges:
        if e.upstream != e.downstream and e.weight > 0:
            out[(e.upstream, e.downstream)] = out.get((e.upstream, e.downstream), 0.0) + e.weight
    return dict(sorted(out.items()))


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
    edges = _merged_edges(p)
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
                miss_cost=sum(_miss_costs(p)[e] for e in offloaded))


def _reasons(p: PlacementProblem, homes: dict[str, str], replicas: dict[str, set[str]], cut,
             offloaded: set[str] = frozenset()) -> dict[str, str]:
    edges = _merged_edges(p)
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
                     f"{_miss_costs(p)[e]:.3g} calls/s-equivalent, the least of what could leave)")
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
    miss = _miss_costs(p)
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
            elif e.memory_bytes + e.activation_bytes > _device_capacity(p, p.nodes[n]):  # its pool could never load it
                rows.add({lay.x(i, n): 1.0}, 0, 0)
            else:
                # a replica beside its home is only worth its memory on the device: x - h <= d
                rows.add({lay.x(i, n): 1.0, lay.h(i, n): -1.0, lay.d(i, n): -1.0}, -np.inf, 0)
                if not p.config.allow_replicas:
                    rows.add({lay.x(i, n): 1.0, lay.h(i, n): -1.0}, 0, 0)
    total_load = sum(e.load for e in experts if not e.everywhere)
    bound = _balance_bound(p)
    for n, node in enumerate(p.nodes):
        rows.add({**{lay.d(i, n): float(e.memory_bytes) for i, e in enumerate(experts) if not e.everywhere},
                  lay.a(n): 1.0}, 0, float(_device_capacity(p, node)))
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


Solved = tuple[dict[str, str], dict[str, set[str]], set[str]]  # homes, replicas, homes off the device


def _solve_exact(p: PlacementProblem) -> Solved | None:
    nodes = [n.name for n in p.nodes]
    edges = [(u, v, w) for (u, v), w in _merged_edges(p).items()]
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


# ---------------------------------------------------------------------------------------------- heuristic
@dataclass
class _Nodes:
    """The heuristic's view of every node: what it holds (homes and replicas), what its device holds, its load."""

    p: PlacementProblem
    by_name: dict[str, ExpertDemand]
    cap: dict[str, int]
    held: dict[str, set[str]]
    resident: dict[str, set[str]]
    load: dict[str, float]

    @classmethod
    def empty(cls, p: PlacementProblem) -> _Nodes:
        names = [n.name for n in p.nodes]
        return cls(p, {e.name: e for e in p.experts}, {n.name: _device_capacity(p, n) for n in p.nodes},
                   {n: set() for n in names}, {n: set() for n in names}, {n: 0.0 for n in names})

    def free(self, n: str) -> int:
        return self.cap[n] - node_bytes(self.by_name, self.held[n], self.resident[n])

    def fits(self, n: str, add: set[str], *, resident: bool = True) -> bool:
        """Whether node `n` still fits with `add` held there (on its device when `resident`)."""
        return node_bytes(self.by_name, self.held[n] | add, self.resident[n] | (add if resident else set())) \
            <= self.cap[n]

    def put(self, n: str, add: set[str], *, resident: bool = True, home: bool = True) -> None:
        self.held[n] |= add
        if resident:
            self.resident[n] |= add
        if home:
            self.load[n] += sum(self.by_name[e].load for e in add)

    def take(self, n: str, e: str) -> None:
        self.held[n].discard(e)
        self.resident[n].discard(e)
        self.load[n] -= self.by_name[e].load


def _solve_heuristic(p: PlacementProblem) -> Solved | None:
    by_name = {e.name: e for e in p.experts}
    state = _Nodes.empty(p)
    bound = _balance_bound(p)
    movable = sorted(e.name for e in p.experts if not e.everywhere)
    edges = sorted(((w, u, v) for (u, v), w in _merged_edges(p).items() if u in movable and v in movable),
                   key=lambda t: (-t[0], t[1], t[2]))
    groups = _merge_along_heaviest_edges(by_name, movable, edges, max(state.cap.values()), bound)
    homes = _first_fit_decreasing(p, groups, state, bound)
    if homes is None:
        return None
    _improve(p, homes, movable, state, bound)
    replicas = {e: {homes[e]} for e in movable}
    if p.config.allow_replicas:
        _replicate_cut_downstreams(edges, homes, replicas, state)
    offloaded = _choose_resident(p, homes, replicas, state)
    for e in p.experts:
        if e.everywhere:
            homes[e.name] = p.nodes[0].name
            replicas[e.name] = {n.name for n in p.nodes}
    return homes, replicas, offloaded


def _merge_along_heaviest_edges(by_name: dict[str, ExpertDemand], movable: list[str],
                                edges: list[tuple[float, str, str]], cap_bytes: int, bound: float) -> list[set[str]]:
    """Step 1: merge groups along the heaviest edges while a group still fits `cap_bytes` (the largest node's device,
    every member resident) and the balance bound; the groups, largest memory first."""
    cluster = {e: {e} for e in movable}
    for _, u, v in edges:
        a, b = cluster[u], cluster[v]
        if a is b:
            continue
        merged = a | b
        if node_bytes(by_name, merged, merged) <= cap_bytes and sum(by_name[e].load for e in merged) <= bound:
            for e in merged:
                cluster[e] = merged
    return sorted({id(c): c for c in cluster.values()}.values(),
                  key=lambda g: (-node_bytes(by_name, g, g), sorted(g)))


def _first_fit_decreasing(p: PlacementProblem, groups: list[set[str]], state: _Nodes,
                          bound: float) -> dict[str, str] | None:
    """Step 2: each group onto the node with the most free device memory that holds it resident and keeps the balance
    bound (preferring the node the current placement has it on), splitting a group that fits nowhere; an expert that
    fits no device goes, off the device, to the least loaded node whose pool can load it. None: even that breaks the
    balance bound."""
    by_name = state.by_name
    order = {n.name: i for i, n in enumerate(p.nodes)}
    homes: dict[str, str] = {}
    for group in groups:
        pieces = [group]
        while pieces:
            piece = pieces.pop(0)
            ld = sum(by_name[e].load for e in piece)
            fits = [n for n in state.cap if state.fits(n, piece) and state.load[n] + ld <= bound]
            if fits:
                target = max(fits, key=lambda n: (sum(n in p.current.get(e, ()) for e in piece), state.free(n),
                                                  -order[n]))
                state.put(target, set(piece))
                homes.update({e: target for e in piece})
            elif len(piece) > 1:  # split the group: largest expert alone, the rest together
                big = max(sorted(piece), key=lambda e: by_name[e].memory_bytes + by_name[e].activation_bytes)
                pieces[:0] = [{big}, piece - {big}]
            else:
                (e,) = piece
                able = [n for n in state.cap if by_name[e].memory_bytes + by_name[e].activation_bytes <= state.cap[n]
                        and state.load[n] + ld <= bound]
                if not able:
                    return None
                target = min(able, key=lambda n: (state.load[n], -state.free(n), order[n]))
                state.put(target, {e}, resident=False)
                homes[e] = target
    return homes


def _choose_resident(p: PlacementProblem, homes: dict[str, str], replicas: dict[str, set[str]],
                     state: _Nodes) -> set[str]:
    """Step 4: per node, which homes its device holds, beside the extra replicas (always resident) and the reserve for
    the largest batch of what it holds: the most miss cost per byte first, while they fit. Returns the homes off the
    device."""
    by_name, miss = state.by_name, _miss_costs(p)
    offloaded: set[str] = set()
    for n in state.cap:
        held = {e for e, ns in replicas.items() if n in ns}
        extra = {e for e in held if homes[e] != n}
        resident = set(extra)
        for e in sorted(held - extra, key=lambda e: (-miss[e] / max(by_name[e].memory_bytes, 1), e)):
            if node_bytes(by_name, held, resident | {e}) <= state.cap[n]:
                resident.add(e)
            else:
                offloaded.add(e)
        state.held[n], state.resident[n] = held, resident
    return offloaded


def _replicate_cut_downstreams(edges: list[tuple[float, str, str]], homes: dict[str, str],
                               replicas: dict[str, set[str]], state: _Nodes) -> None:
    """Step 3: a replica of each cut downstream expert on its upstream's node, heaviest cut first, while device memory
    allows (an extra replica off the device would only trade a hop for a switch)."""
    for _, u, v in edges:
        n = homes[u]
        if n not in replicas[v] and state.fits(n, {v}):
            replicas[v].add(n)
            state.put(n, {v}, home=False)


def _improve(p: PlacementProblem, homes: dict[str, str], movable: list[str], state: _Nodes, bound: float) -> None:
    """Local search: move one expert at a time to the node that cuts the least weight (held resident there), while
    any move helps."""
    by_name = state.by_name
    edges = [(u, v, w) for (u, v), w in _merged_edges(p).items() if u in homes and v in homes
             and not by_name[u].everywhere and not by_name[v].everywhere]

    def cut_of(e: str, node: str) -> float:
        return sum(w for u, v, w in edges if e in (u, v) and homes[v if u == e else u] != node)

    improved = True
    while improved:
        improved = False
        for e in movable:
            here, ld = homes[e], by_name[e].load
            for node in sorted(state.cap):
                if node == here or not state.fits(node, {e}) or state.load[node] + ld > bound:
                    continue
                if cut_of(e, node) < cut_of(e, here) - 1e-12:
                    state.take(here, e)
                    state.put(node, {e})
                    homes[e], here, improved = node, node, True


# ---------------------------------------------------------------------------------------------- entry points
def plan(problem: PlacementProblem, method: str = "auto") -> Plan:
    """The placement for `problem`: exact when small enough (or asked), else the heuristic."""
    _check(problem)
    nvar = len(problem.experts) * len(problem.nodes) * 3 + len(_merged_edges(problem)) * len(problem.nodes)
    use_exact = method == "exact" or (method == "auto" and nvar <= problem.config.exact_max_variables)
    if method not in ("auto", "exact", "heuristic"):
        raise InvalidArgument(f"unknown method {method!r}", field="method", fix="use auto, exact or heuristic")
    solved = _solve_exact(problem) if use_exact else _solve_heuristic(problem)
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
    bound = _balance_bound(problem)
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
        cut = sum(w for (u, v), w in _merged_edges(problem).items() if u in homes and v in homes and homes[u] != homes[v])
        best = min(best, cut)
    return best
