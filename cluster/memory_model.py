"""One memory model for planning and serving (CoServe's memory-aware resource allocation), per node. Pure.

A node's pooled experts are held in tiers by its expert host replicas (executors): on the device, as a copy in host
memory, or loaded from disk on demand. `plan_node` decides, for the experts the placement put on a node, how many
executors it runs and how much device and host memory each gets, and so which experts start on the device, which in
host memory and which are loaded on demand - by predicting each choice with the simulator (`cluster.simulate`), which
runs the pooled host's own code: `experts.tiering.warm_plan` (what a replica starts with, most used first - the same
call the host makes when it is configured), `experts.arrange`, `experts.tiering.make_room` / `experts.eviction`,
`experts.prefetch` and, with several executors, `router.assign`. The costs are the profile's: K*n + B per batch at the
serving batch, the measured load times from host memory and from disk, the bytes, each expert's calls per second
from the usage the plan assumes, and the dependency edges' rates (which chains a request makes, and what prefetch
loads).

For every executor count from 1 up to the node's compute slots (more executors run batches on more cores at once but
each holds a smaller share of the memory, so more calls wait for switches), two seeded simulations of requests drawn
from the node's calls (one component each, or boards of `components_per_request` whose calls run in waves): closed
loop (enough stations to keep the node busy) gives the calls/s the node sustains, open loop at the planned rate the
switches/s it will make there. The fewest executors that sustain `headroom` x the planned calls win, else the
fastest; then arrange's wait bound (`max_wait_s`: how long a call may wait for its expert's group while resident
experts run first) is chosen among `WAITS_S` the same way - a longer wait groups more calls per switch, a shorter one
keeps a board's waves moving. A node whose memory holds every expert it is given predicts no switch at all;
a node that holds few still gets a plan - slower, never refused. What cannot be served at all is an expert larger
than an executor's device budget (with a batch's activations beside it), and `plan_node` never picks such a count.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from expertmesh.cluster.simulate import POLICIES, SimConfig, SimExpert, SimRequest, SimResult, simulate
from expertmesh.cluster.simulate_model import AssignPolicy
from expertmesh.cluster.costs import ExpertCost
from expertmesh.experts.tiering import warm_plan

if TYPE_CHECKING:
    from expertmesh.cluster.dedicate import Dedication

CLOSED_LOOP_STATIONS = 16  # components in flight that keep a node busy enough for arrange to group calls
WAITS_S = (0.05, 0.1, 0.2, 0.5)  # arrange's wait bounds tried (the pooled host's pool_max_wait_s; default 0.5)
NUM_REQUESTS = 300  # per simulation: a few hundred calls settle the switch rate and keep a plan under a second
MAX_WAIT_MS = 500.0  # the pooled host's pool_max_wait_s default
SEED = 0


@dataclass(frozen=True)
class NodeMemory:
    """What a node offers its pooled experts (after dedicated deployments took theirs)."""

    device_bytes: int  # the device memory the pool's replicas divide (experts and a batch's activations each)
    host_bytes: int | None  # host memory for copies of the weights, divided among the replicas (None: no limit)
    compute_slots: float  # batches the node can run at once (its cores over the torch threads; a GPU: 1 or more)
    loads_use_compute: bool = True  # CPU: a switch copies with the cores that infer; GPU: its own copy engine


@dataclass(frozen=True)
class NodePlan:
    """One node's pooled hosts: the executor count, each executor's budgets, the tiers and the prediction."""

    num_replicas: int
    device_budget_bytes: int  # per replica, for resident experts (activations reserved apart)
    host_budget_bytes: int | None  # per replica
    activation_reserve_bytes: int  # per replica
    resident: tuple[str, ...]  # start on the device (every replica: they are configured alike)
    host: tuple[str, ...]  # start with a host-memory copy and not on the device
    on_demand: tuple[str, ...]  # loaded from disk when called
    predicted_calls_per_s: float  # what the node sustains (closed loop)
    predicted_switches_per_s: float  # at the planned rate (open loop)
    planned_calls_per_s: float
    hit_share: float  # share of the planned calls whose expert starts on the device
    reason: str
    options: tuple[dict, ...] = field(default=())  # every executor count tried: its prediction
    dedicated: dict[str, Dedication] = field(default_factory=dict)  # the node's hot experts (`cluster.dedicate`)
    max_wait_s: float = MAX_WAIT_MS / 1000.0  # arrange's wait bound for this node's pools

    def to_json(self) -> dict:
        return {"num_replicas": self.num_replicas, "device_budget_bytes": self.device_budget_bytes,
                "host_budget_bytes": self.host_budget_bytes, "activation_reserve_bytes": self.activation_reserve_bytes,
                "resident": list(self.resident), "host": list(self.host), "on_demand": list(self.on_demand),
                "predicted_calls_per_s": round(self.predicted_calls_per_s, 3),
                "predicted_switches_per_s": round(self.predicted_switches_per_s, 4),
                "planned_calls_per_s": round(self.planned_calls_per_s, 3), "hit_share": round(self.hit_share, 4),
                "max_wait_s": self.max_wait_s,
                "reason": self.reason, "options": list(self.options),
                "dedicated": {e: d.to_json() for e, d in sorted(self.dedicated.items())}}


def sim_experts(experts: Sequence[ExpertCost], edges: Mapping[tuple[str, str], float]) -> dict[str, SimExpert]:
    """The node's experts as the simulator's: profile costs, usage (share of the node's calls), upstreams and trigger
    probabilities from the edges between them (`edges`: (upstream, downstream) -> calls/s)."""
    names = {e.name for e in experts}
    calls = {e.name: e.calls_per_s for e in experts}
    total = sum(calls.values()) or 1.0
    out = {}
    for e in experts:
        ups = frozenset(u for (u, d) in edges if d == e.name and u in names)  # the node's dependency edges
        triggers = tuple(sorted((d, min(1.0, w / calls[e.name])) for (u, d), w in edges.items()
                                if u == e.name and d in names and calls[e.name] > 0))
        out[e.name] = SimExpert(num_bytes=max(1, e.weights_bytes), k_ms_per_item=e.k_ms_per_item,
                                b_ms=e.b_ms_per_batch, max_batch=e.batch_size, usage=calls[e.name] / total,
                                upstreams=ups, load_from_host_ms=e.switch_ms,
                                load_from_disk_ms=e.disk_switch_ms or None, triggers=triggers)
    return out


def node_requests(experts: Mapping[str, SimExpert], entry_per_s: Mapping[str, float], num_requests: int,
                  rate_per_s: float | None, seed: int = SEED, components_per_request: int = 1) -> list[SimRequest]:
    """Seeded requests of the node's calls: the first call drawn by each expert's entry rate (its calls not made by an
    upstream on this node), each output triggering its downstream experts with the edges' probabilities (wave by
    wave); open loop at `rate_per_s` requests/s (exponential gaps), or arrival 0 for a closed loop (None); with
    `components_per_request` > 1, boards of that many such components."""
    if components_per_request > 1:
        parts = node_requests(experts, entry_per_s, num_requests * components_per_request, None, seed)
        rng, out, t = random.Random(seed + 7), [], 0.0
        for i in range(num_requests):
            board = parts[i * components_per_request:(i + 1) * components_per_request]
            if rate_per_s:
                t += rng.expovariate(rate_per_s)
            out.append(SimRequest.board(t, tuple(p.chain for p in board),
                                        branches=tuple((k, st, e) for k, p in enumerate(board)
                                                       for _, st, e in p.branches)))
        return out
    rng = random.Random(seed)
    names = sorted(n for n, w in entry_per_s.items() if w > 0)
    weights = [entry_per_s[n] for n in names]
    out, t = [], 0.0
    for _ in range(num_requests):
        first = rng.choices(names, weights)[0]
        chain, branches, wave = [first], [], [first]
        for step in range(1, 8):  # chains are short; the bound only guards against a cycle
            nxt = [d for e in wave for d, p in experts[e].triggers if rng.random() < p]
            if not nxt:
                break
            chain.append(nxt[0])
            branches += [(0, step, d) for d in nxt[1:]]
            wave = nxt
        if rate_per_s:
            t += rng.expovariate(rate_per_s)
        out.append(SimRequest(t if rate_per_s else 0.0, tuple(chain), branches=tuple(branches)))
    return out


def entry_rates(experts: Sequence[ExpertCost], edges: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """calls/s of each expert that no upstream on the node makes (requests' first calls and calls sent from
    elsewhere)."""
    names = {e.name for e in experts}
    return {e.name: max(0.0, e.calls_per_s - sum(w for (u, d), w in edges.items() if d == e.name and u in names))
            for e in experts}


def _config(node: NodeMemory, replicas: int, reserve: int, *, stations: int | None,
            max_wait_ms: float = MAX_WAIT_MS) -> SimConfig:
    return SimConfig(device_budget_bytes=node.device_bytes, host_budget_bytes=node.host_bytes,
                     num_parallel_executors=replicas, activation_reserve_bytes=reserve,
                     compute_slots=max(1, min(replicas, int(node.compute_slots))),
                     loads_use_compute=node.loads_use_compute, host_to_device_bytes_per_s=1e9, disk_bytes_per_s=2e8,
                     max_wait_ms=max_wait_ms, warm_start=True, closed_loop_stations=stations)


def stations_for(components_per_request: int) -> int:
    """Closed-loop stations that keep about CLOSED_LOOP_STATIONS components in flight (at least 4 requests)."""
    return max(4, CLOSED_LOOP_STATIONS // max(1, components_per_request))


def _policy(replicas: int):
    return POLICIES["evict_arrange_prefetch"] if replicas == 1 else POLICIES["expertmesh"].model_copy(
        update={"assign": AssignPolicy.PREDICTED})


def predict(experts: Sequence[ExpertCost], edges: Mapping[tuple[str, str], float], node: NodeMemory,
            replicas: int, *, max_wait_s: float = MAX_WAIT_MS / 1000.0,
            components_per_request: int = 1) -> tuple[SimResult, SimResult | None, SimConfig] | None:
    """(closed-loop result, open-loop result at the planned rate or None without traffic, the config) with
    `replicas` executors; None when an executor could not hold the largest expert beside a batch's activations."""
    reserve = max((e.activation_bytes for e in experts), default=0)
    config = _config(node, replicas, reserve, stations=stations_for(components_per_request),
                     max_wait_ms=1000.0 * max_wait_s)
    if config.pool_budget_bytes(replicas) < max((e.weights_bytes for e in experts), default=0):
        return None
    sims = sim_experts(experts, edges)
    entry = entry_rates(experts, edges)
    if not any(w > 0 for w in entry.values()):
        entry = {e.name: 1.0 for e in experts}  # no traffic planned: every expert alike
    policy = _policy(replicas)
    n = max(48, NUM_REQUESTS // components_per_request)  # boards: enough of them that their waves settle
    closed = simulate(sims, node_requests(sims, entry, n, None, components_per_request=components_per_request),
                      config, policy)
    opened = None
    if sum(e.calls_per_s for e in experts) > 0:  # requests/s to the node: one entry call per component
        rate = sum(entry.values()) / components_per_request
        requests = node_requests(sims, entry, n, rate, seed=SEED + 1, components_per_request=components_per_request)
        opened = simulate(sims, requests, config.model_copy(update={"closed_loop_stations": None}), policy)
    return closed, opened, config


def _rate(result: SimResult) -> float:
    return result.num_calls / (result.makespan_ms / 1000.0) if result.makespan_ms > 0 else float("inf")


def plan_node(experts: Sequence[ExpertCost], edges: Mapping[tuple[str, str], float], node: NodeMemory, *,
              max_replicas: int = 4, headroom: float = 2.0, components_per_request: int = 1,
              waits_s: Sequence[float] = WAITS_S) -> NodePlan:
    """The node's pooled hosts (see the module doc): `experts` with their planned calls/s, `edges` (upstream,
    downstream) -> calls/s between them, requests of `components_per_request` components (a board: more)."""
    planned = sum(e.calls_per_s for e in experts)
    reserve = max((e.activation_bytes for e in experts), default=0)
    sizes = {e.name: max(1, e.weights_bytes) for e in experts}
    usage = {e.name: e.calls_per_s for e in experts}
    shape = {"components_per_request": components_per_request}
    options: list[tuple[int, float, float, SimConfig]] = []
    limit = max(1, min(max_replicas, int(node.compute_slots) if node.compute_slots >= 1 else 1))
    for r in range(1, limit + 1):
        got = predict(experts, edges, node, r, **shape)
        if got is None:
            break  # more replicas only make each one's share smaller
        closed, opened, config = got
        per_call = (opened.switches / opened.num_calls) if opened and opened.num_calls else 0.0
        options.append((r, _rate(closed), per_call * planned, config))
    if not options:
        largest = max(experts, key=lambda e: e.weights_bytes)
        return NodePlan(1, max(0, node.device_bytes - reserve), node.host_bytes, reserve, (), (),
                        tuple(e.name for e in experts), 0.0, 0.0, planned, 0.0,
                        f"cannot serve {largest.name} here: {largest.weights_bytes} bytes of weights beside "
                        f"{reserve} bytes of activations exceed the node's {node.device_bytes} bytes")
    enough = [o for o in options if o[1] >= headroom * planned]
    best = max(o[1] for o in options)
    r, rate, switches, config = enough[0] if enough else next(o for o in options if o[1] >= 0.98 * best)
    waits = {config.max_wait_ms / 1000.0: (rate, switches)}
    for wait in waits_s:
        if wait not in waits:
            closed, opened, _ = predict(experts, edges, node, r, max_wait_s=wait, **shape)
            per_call = (opened.switches / opened.num_calls) if opened and opened.num_calls else 0.0
            waits[wait] = (_rate(closed), per_call * planned)
    wait = max(sorted(waits, reverse=True), key=lambda w: waits[w][0] * (1.0 + 1e-9 * w))  # ties: the longer wait
    rate, switches = waits[wait]
    device = config.pool_budget_bytes(r)
    host = config.pool_host_budget_bytes(r)
    warm = warm_plan(list(sizes), sizes, usage, device_budget_bytes=device, host_budget_bytes=host)
    resident = warm.device
    host_only = tuple(e for e in warm.host if e not in resident)
    hit = sum(usage[e] for e in resident) / planned if planned > 0 else 1.0
    tried = ", ".join(f"{n}: {c:.0f} calls/s, {s:.2f} switches/s" for n, c, s, _ in options)
    why = (f"{'the fewest that sustain' if enough else 'none sustains, so the fastest for'} {headroom * planned:.1f} "
           f"calls/s ({headroom:g}x the planned {planned:.1f}); predicted by executors (simulated): {tried}; arrange "
           f"waits at most {wait:g} s (" + ", ".join(f"{w:g} s: {c:.0f} calls/s" for w, (c, _) in sorted(waits.items()))
           + ")")
    return NodePlan(r, device, host, reserve, resident, host_only, tuple(warm.on_demand(list(sizes))), rate, switches,
                    planned, hit, why, tuple({"num_replicas": n, "predicted_calls_per_s": round(c, 3),
                                              "predicted_switches_per_s": round(s, 4)} for n, c, s, _ in options),
                    max_wait_s=wait)
