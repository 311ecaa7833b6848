"""A discrete-event simulator of one pooled executor under a memory budget, driving the pure policies. Pure.

It replays a workload (requests arriving at given times, each a chain of expert calls: a call's downstream call is
queued when it finishes) through one executor with a device budget, using the same policy modules the hosts use:
`experts.arrange.next_batch` picks what runs next, `experts.eviction.choose_evictions` makes room for a switch.
Costs are given per expert (the profile's K*n+B, a load time, the weights' bytes). It reports throughput, latency
and switches, so policies can be compared at scales this machine cannot run (the memory-limited serving issue
builds its simulator table on this). No Ray, no clock but the simulated one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from expertmesh.experts.arrange import ArrangePolicy, next_batch
from expertmesh.experts.eviction import EvictionPolicy, ResidentExpert, choose_evictions


@dataclass(frozen=True)
class SimExpert:
    num_bytes: int
    k_ms_per_item: float
    b_ms: float
    load_ms: float  # onto the device, from wherever it sits
    max_batch: int = 32
    usage: float = 0.0


@dataclass(frozen=True)
class SimRequest:
    arrival_ms: float
    chain: tuple[str, ...]  # expert calls in dependency order: each queued when the previous one finishes


@dataclass(frozen=True)
class SimResult:
    num_requests: int
    makespan_ms: float
    switches: int
    p50_ms: float
    p99_ms: float

    @property
    def throughput_per_s(self) -> float:
        return self.num_requests / (self.makespan_ms / 1000.0) if self.makespan_ms > 0 else 0.0


def simulate(experts: Mapping[str, SimExpert], requests: Sequence[SimRequest], budget_bytes: int, *,
             arrange: ArrangePolicy, evict: EvictionPolicy, upstreams: Mapping[str, set[str]],
             max_wait_ms: float = 50.0) -> SimResult:
    """Run every request to the end of its chain on one executor; raises ValueError if an expert cannot fit."""
    too_big = [e for e, x in experts.items() if x.num_bytes > budget_bytes]
    if too_big:
        raise ValueError(f"experts {too_big} are larger than the budget of {budget_bytes} bytes; raise the budget")
    pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival_ms)
    queue: dict[str, list[tuple[float, int, int]]] = defaultdict(list)  # expert -> (queued at, request, step)
    resident: dict[str, tuple[float, float]] = {}  # expert -> (loaded at, last used)
    now, switches, done = 0.0, 0, {}
    nxt = 0
    while nxt < len(pending) or any(queue.values()):
        while nxt < len(pending) and requests[pending[nxt]].arrival_ms <= now:
            i = pending[nxt]
            queue[requests[i].chain[0]].append((requests[i].arrival_ms, i, 0))
            nxt += 1
        pick = next_batch(arrange, {e: [t for t, _, _ in q] for e, q in queue.items()}, resident.keys(), now,
                          max_wait_s=max_wait_ms, max_batch={e: x.max_batch for e, x in experts.items()})
        if pick is None:
            now = requests[pending[nxt]].arrival_ms  # idle until the next arrival
            continue
        e = pick.expert
        if e not in resident:
            free = budget_bytes - sum(experts[r].num_bytes for r in resident)
            snap = [ResidentExpert(r, experts[r].num_bytes, last_used_s=used, loaded_s=loaded, usage=experts[r].usage)
                    for r, (loaded, used) in resident.items()]
            for ev in choose_evictions(evict, snap, upstreams, need_bytes=experts[e].num_bytes, free_bytes=free,
                                       protect={e}) or []:
                del resident[ev.expert]
            now += experts[e].load_ms
            switches += 1
            resident[e] = (now, now)
        batch = sorted(queue[e])[:pick.num_calls]
        queue[e] = sorted(queue[e])[pick.num_calls:]
        now += experts[e].k_ms_per_item * len(batch) + experts[e].b_ms
        resident[e] = (resident[e][0], now)
        for _, i, step in batch:
            chain = requests[i].chain
            if step + 1 < len(chain):
                queue[chain[step + 1]].append((now, i, step + 1))
            else:
                done[i] = now - requests[i].arrival_ms
    latencies = sorted(done.values())
    pct = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else (lambda q: 0.0)
    start = min((r.arrival_ms for r in requests), default=0.0)
    return SimResult(len(done), now - start, switches, pct(0.5), pct(0.99))
