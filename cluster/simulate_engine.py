"""The simulator's event loop: one task's requests through one device's executors, driving the pure policies. Pure.

The device has three resources, each doing one thing at a time in the order asked: compute (the executors' batches
share it), the host -> device copy and the disk read (loads share them). So with parallel executors one loads while
another computes, but two loads from disk take turns. Each executor is sequential: it picks its next batch with
`experts.arrange.next_batch`; when the expert is not in its pool it makes room with
`experts.eviction.choose_evictions` (evicted experts go to the host tier, `simulate_tiers`, which drops host copies
by `experts.tiering.make_room`'s rule for the policy's eviction) and loads it from the host tier or disk; then runs
the batch. Each arriving call (a request's first, or a dependent call when its upstream finished) goes to an
executor: the only one, in turn (round robin), or the one `router.assign.choose_replica` predicts finishes it first
(queued work at K*n+B plus the switch from the expert's tier). The clock is simulated. Requests arrive at their
times (open loop), or from `closed_loop_stations` stations, each sending its next request `turnaround_ms` after its
last one was answered (closed loop, as the memory benchmark drives a real host).

Demoting an evicted expert to host memory costs no time here (a device -> host copy runs on its own copy engine);
the baselines' LRU and FIFO ignore queued work, while CoServe's eviction never takes an expert with queued calls
unless nothing else makes room.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from expertmesh.cluster.simulate_model import AssignPolicy, PolicySpec, SimConfig, SimExpert, SimRequest
from expertmesh.cluster.simulate_tiers import DevicePool, Tier, Tiers
from expertmesh.experts.arrange import ArrangePolicy, next_batch
from expertmesh.experts.eviction import EvictionPolicy, ResidentExpert, choose_evictions
from expertmesh.router.assign import ExpertCost, ReplicaSnapshot, choose_replica

COMPUTE, HOST_COPY, DISK_READ = "compute", "host_copy", "disk_read"
_ARRIVE, _LOADED, _DONE = 0, 1, 2

Call = tuple[float, int, int]  # (queued at ms, request index, step in its chain)


@dataclass
class _Executor:
    index: int
    queue: dict[str, list[Call]] = field(default_factory=lambda: defaultdict(list))  # in queued order
    busy: bool = False
    running: tuple[str, int] | None = None  # expert and calls of the batch running (out of the queue)
    planned_calls: int = 0  # FCFS: the batch picked before its load


@dataclass
class TaskOutcome:
    latencies_ms: list[float]
    makespan_ms: float
    tiers: Tiers
    evictions: Counter
    num_batches: int
    num_calls: int


def warm_start(experts: Mapping[str, SimExpert], pool_budgets_bytes: Sequence[int], host_budget_bytes: int
               ) -> tuple[list[list[tuple[str, float]]], list[tuple[str, float]]]:
    """Where a task starts: the most used experts in the pools (dealt in turn while they fit), each with a last use
    that makes less used mean longer ago (LRU and FIFO start from the usage order too); then the next ones that fit
    in the host tier, least used (longest ago) first."""
    ranked = sorted(experts, key=lambda e: (-experts[e].usage, e))
    used = [0] * len(pool_budgets_bytes)
    pools: list[list[tuple[str, float]]] = [[] for _ in pool_budgets_bytes]
    rest = []
    for rank, e in enumerate(ranked):
        size = experts[e].num_bytes
        order = [(rank + j) % len(used) for j in range(len(used))]
        fits = next((i for i in order if used[i] + size <= pool_budgets_bytes[i]), None)
        if fits is None:
            rest.append((e, -1e-3 * (rank + 1)))
        else:
            used[fits] += size
            pools[fits].append((e, -1e-3 * (rank + 1)))
    room, host = host_budget_bytes, []
    for e, last_used_ms in rest:
        if experts[e].num_bytes <= room:
            host.append((e, last_used_ms))
            room -= experts[e].num_bytes
    return pools, host[::-1]


class _Task:
    def __init__(self, experts: Mapping[str, SimExpert], requests: Sequence[SimRequest], config: SimConfig,
                 policy: PolicySpec) -> None:
        self.experts, self.requests, self.config, self.policy = experts, requests, config, policy
        n = config.num_executors(policy.assign)
        budget = config.pool_budget_bytes(n)
        self.executors = [_Executor(i) for i in range(n)]
        host_policy = EvictionPolicy.LRU if policy.host_tier_lru else policy.evict  # as experts/tiering.py
        self.tiers = Tiers([DevicePool(budget) for _ in range(n)], config.host_budget_bytes, host_policy,
                           {e: x.usage for e, x in experts.items()})
        self.free_at_ms = {COMPUTE: 0.0, HOST_COPY: 0.0, DISK_READ: 0.0}
        self.events: list[tuple[float, int, int, tuple]] = []
        self.seq = 0
        self.now_ms = 0.0
        self.next_round_robin = 0
        self.latencies_ms: list[float] = []
        self.arrival_ms = [r.arrival_ms for r in requests]  # closed loop: set as each request is sent
        self.next_request = 0  # closed loop: the next request a station sends
        self.evictions: Counter = Counter()
        self.num_batches = self.num_calls = 0
        self.max_batch = {e: x.max_batch for e, x in experts.items()}
        self.upstreams = {e: x.upstreams for e, x in experts.items() if x.upstreams}
        if config.warm_start:
            self._warm_start()

    def _warm_start(self) -> None:
        pools, host = warm_start(self.experts, [p.budget_bytes for p in self.tiers.pools], self.tiers.host_budget_bytes)
        for i, placed in enumerate(pools):
            for e, last_used_ms in placed:
                self.tiers.place(i, e, self.experts[e].num_bytes, last_used_ms)
        for e, last_used_ms in host:
            self.tiers.stock_host(e, self.experts[e].num_bytes, last_used_ms)

    def _push(self, at_ms: float, kind: int, data: tuple) -> None:
        heapq.heappush(self.events, (at_ms, self.seq, kind, data))
        self.seq += 1

    def _reserve(self, resource: str, duration_ms: float) -> float:
        """When an operation on `resource` asked for now ends (it waits for the ones asked before)."""
        start = max(self.now_ms, self.free_at_ms[resource])
        self.free_at_ms[resource] = start + duration_ms
        return start + duration_ms

    def load_ms(self, expert: str, tier: Tier) -> float:
        x, c = self.experts[expert], self.config
        if tier is Tier.HOST:
            measured, bytes_per_s, fixed = x.load_from_host_ms, c.host_to_device_bytes_per_s, c.host_load_fixed_ms
        else:
            measured, bytes_per_s, fixed = x.load_from_disk_ms, c.disk_bytes_per_s, c.disk_load_fixed_ms
        return measured if measured is not None else fixed + 1000.0 * x.num_bytes / bytes_per_s

    def run(self) -> TaskOutcome:
        stations = self.config.closed_loop_stations
        warm = min(self.config.warmup_requests, len(self.requests)) if stations is not None else 0
        if warm:  # the warm-up to its last answer, then the counters start from zero (the benchmark's reset_stats)
            self._drive(0, warm)
            self.latencies_ms, self.evictions, self.num_batches, self.num_calls = [], Counter(), 0, 0
            self.tiers.loads, self.tiers.demotions_to_host, self.tiers.dropped_to_disk = Counter(), 0, 0
        self._drive(warm, len(self.requests))
        start = min(self.arrival_ms[warm:])
        return TaskOutcome(self.latencies_ms, self.now_ms - start, self.tiers, self.evictions, self.num_batches,
                           self.num_calls)

    def _drive(self, first: int, end: int) -> None:
        """Requests first..end-1 to their last answer: at their arrival times, or sent by the closed loop's stations
        (each station's first request now, its next one a turnaround after each answer)."""
        stations = self.config.closed_loop_stations
        self.end_request = end
        if stations is None:
            sent = end
        else:
            sent = min(first + stations, end)
            for i in range(first, sent):
                self.arrival_ms[i] = self.now_ms
        for i in range(first, sent):
            self._push(self.arrival_ms[i], _ARRIVE, (self.requests[i].chain[0], i, 0))
        self.next_request = sent
        while self.events:
            self.now_ms, _, kind, data = heapq.heappop(self.events)
            if kind == _ARRIVE:
                self._enqueue(*data)
            elif kind == _LOADED:
                self._run_batch(self.executors[data[0]], data[1])
            else:
                self._finish(self.executors[data[0]], data[1], data[2])

    def _enqueue(self, expert: str, request: int, step: int, *, start: bool = True) -> _Executor:
        x = self.executors[self._assign(expert)]
        x.queue[expert].append((self.now_ms, request, step))
        if start and not x.busy:
            self._start(x)
        return x

    def _assign(self, expert: str) -> int:
        if self.policy.assign is AssignPolicy.SINGLE:
            return 0
        if self.policy.assign is AssignPolicy.ROUND_ROBIN:
            i = self.next_round_robin
            self.next_round_robin = (i + 1) % len(self.executors)
            return i
        snapshots = []
        for x in self.executors:
            queued = {e: len(q) for e, q in x.queue.items() if q}
            if x.running:
                queued[x.running[0]] = queued.get(x.running[0], 0) + x.running[1]
            snapshots.append(ReplicaSnapshot(str(x.index), queued, frozenset(self.tiers.pools[x.index].resident)))
        costs = {e: ExpertCost(s.k_ms_per_item, s.b_ms, self.load_ms(e, self.tiers.source(e)))
                 for e, s in self.experts.items() if e == expert or any(e in snap.queued for snap in snapshots)}
        return int(choose_replica(snapshots, expert, 1, costs))

    def _start(self, x: _Executor) -> None:
        """An idle executor picks its next batch; loads the expert first when it is not in its pool."""
        pool = self.tiers.pools[x.index]
        pick = next_batch(self.policy.arrange, {e: [c[0] for c in q] for e, q in x.queue.items() if q},
                          pool.resident.keys(), self.now_ms, max_wait_s=self.config.max_wait_ms,
                          max_batch=self.max_batch)
        if pick is None:
            x.busy, x.running = False, None
            return
        x.busy, x.planned_calls = True, pick.num_calls  # its calls stay queued (and counted so) until the batch runs
        if pick.expert in pool.resident:
            self._run_batch(x, pick.expert)
            return
        tier = self.tiers.claim(pick.expert)
        self._make_room(x, pick.expert)
        self.tiers.load(x.index, pick.expert, self.experts[pick.expert].num_bytes, self.now_ms, tier)
        done_ms = self._reserve(HOST_COPY if tier is Tier.HOST else DISK_READ, self.load_ms(pick.expert, tier))
        self._push(done_ms, _LOADED, (x.index, pick.expert))

    def _make_room(self, x: _Executor, expert: str) -> None:
        pool = self.tiers.pools[x.index]
        queued = {e for e, q in x.queue.items() if q}
        protect_queued = self.policy.evict is EvictionPolicy.COSERVE

        def snapshot(busy: set[str]) -> list[ResidentExpert]:
            return [ResidentExpert(e, self.experts[e].num_bytes, last_used_s=used, loaded_s=loaded,
                                   busy=e in busy, usage=self.experts[e].usage)
                    for e, (loaded, used) in pool.resident.items()]
        upstreams = self.upstreams
        need, free = self.experts[expert].num_bytes, pool.budget_bytes - pool.used_bytes
        chosen = choose_evictions(self.policy.evict, snapshot(queued if protect_queued else set()), upstreams,
                                  need_bytes=need, free_bytes=free, protect={expert})
        if chosen is None and protect_queued:  # every idle expert together is too small: take queued ones too
            chosen = choose_evictions(self.policy.evict, snapshot(set()), upstreams, need_bytes=need,
                                      free_bytes=free, protect={expert})
        if chosen is None:
            raise ValueError(f"no eviction makes room for {expert} in pool {x.index}; its budget is too small")
        for ev in chosen:
            self.tiers.evict(x.index, ev.expert, ev.num_bytes)
            self.evictions[ev.reason.value] += 1

    def _run_batch(self, x: _Executor, expert: str) -> None:
        """Run the batch: FCFS runs the calls it picked; arrange takes the expert's calls queued now (best batch)."""
        q = x.queue[expert]
        n = x.planned_calls if self.policy.arrange is ArrangePolicy.FCFS else self.max_batch[expert]
        n = max(1, min(n, len(q)))
        batch, x.queue[expert] = q[:n], q[n:]
        x.running = (expert, n)
        self.num_batches += 1
        self.num_calls += n
        done_ms = self._reserve(COMPUTE, self.experts[expert].batch_ms(n) + n * self.config.call_overhead_ms)
        self._push(done_ms, _DONE, (x.index, expert, tuple(batch)))

    def _finish(self, x: _Executor, expert: str, batch: tuple[Call, ...]) -> None:
        """The batch's dependent calls are all queued before any executor picks again (so they can go together)."""
        self.tiers.touch(x.index, expert, self.now_ms)
        x.running = None
        for _, request, step in batch:
            chain = self.requests[request].chain
            if step + 1 < len(chain):
                self._enqueue(chain[step + 1], request, step + 1, start=False)
            else:
                self.latencies_ms.append(self.now_ms - self.arrival_ms[request])
                if self.config.closed_loop_stations is not None and self.next_request < self.end_request:
                    i, self.next_request = self.next_request, self.next_request + 1
                    self.arrival_ms[i] = self.now_ms + self.config.turnaround_ms
                    self._push(self.arrival_ms[i], _ARRIVE, (self.requests[i].chain[0], i, 0))
        x.busy = False
        for y in [x] + [y for y in self.executors if y is not x]:
            if not y.busy:
                self._start(y)


def run_task(experts: Mapping[str, SimExpert], requests: Sequence[SimRequest], config: SimConfig,
             policy: PolicySpec) -> TaskOutcome:
    """Every request of one task to the end of its chain; the tiers and counters as they ended."""
    return _Task(experts, requests, config, policy).run()
