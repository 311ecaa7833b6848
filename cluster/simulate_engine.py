"""The simulator's event loop: one task's requests through one machine's executors, driving the serving code. Pure.

The machine has compute slots (`SimConfig.compute_slots`: batches that can run at once), a host -> device copy and
a disk read; each does one thing at a time in the order asked, and a load takes a compute slot instead of a copy
engine where `loads_use_compute` (a CPU copies weights with the cores that infer).

Pooled hosts (the ExpertMesh policies and their baselines): each executor is one host replica with its own pool
(`simulate_tiers`: device and host budgets, inclusive tiers). A request goes to one executor - the only one, in turn,
Serve's power of two choices, or the one `router.assign.rank_replicas` predicts finishes it first - and all its calls
run there in waves, as a host's `run` makes them: every component's first call, then the dependent calls its outputs
trigger once the wave is done. An idle executor picks its next batch with `experts.arrange.next_batch` (split evenly,
`experts.pool.split_batches`), makes room by the host's own `experts.tiering.make_room` when the expert is not on
its device and loads it from host memory or disk, runs the batch, and, when no other expert's calls wait, loads the
likely downstream experts into free memory (`experts.prefetch`, inside the batch's time, as the host does).

Ray Serve multiplexing (`PolicySpec.serve_multiplexed`): each deployment is one executor. Calls join its
`@serve.batch` queue; a window opens at the first call and closes `batch_wait_ms` later or when full, and closed
windows run in order, split by model: a model not among the replica's K (by count, least recently used evicted) is
loaded from the load function's host cache or disk. The driver follows the chains (dependent calls reach the queue a
`turnaround_ms` after their upstream answered).

Requests arrive at their times (open loop), or from `closed_loop_stations` stations, each sending its next request
`turnaround_ms` after its last one was answered (closed loop, as the memory benchmark drives a real host). The clock
is simulated.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from expertmesh.cluster.simulate_model import AssignPolicy, PolicySpec, ServeDeployment, SimConfig, SimExpert, SimRequest
from expertmesh.cluster.simulate_tiers import SimPool, Tier, Tiers
from expertmesh.experts.arrange import ArrangePolicy, next_batch
from expertmesh.experts.pool import split_batches
from expertmesh.experts.prefetch import prefetch
from expertmesh.router.assign import ExpertCost, ReplicaSnapshot, rank_replicas

COMPUTE, HOST_COPY, DISK_READ = "compute", "host_copy", "disk_read"
_ARRIVE, _LOADED, _DONE, _WINDOW, _CALLS = 0, 1, 2, 3, 4
PREFETCH_MIN_PROBABILITY = 0.5  # the pooled host's default (PoolSettings.prefetch_min_probability)

Call = tuple[float, int, int, int]  # (queued at ms, request index, component, step in its chain)


@dataclass
class _Executor:
    index: int
    queue: dict[str, list[Call]] = field(default_factory=lambda: defaultdict(list))  # pools: per expert, in order
    busy: bool = False
    running: tuple[str, int] | None = None  # expert and calls of the batch running (out of the queue)
    planned_calls: int = 0  # FCFS: the batch picked before its load
    in_flight: int = 0  # requests sent here and not answered (Serve's power of two choices reads it)
    # Serve multiplexing
    deployment: ServeDeployment | None = None
    collecting: list[tuple[Call, str]] = field(default_factory=list)  # the window being formed
    window_id: int = 0
    windows: deque = field(default_factory=deque)  # closed windows, to run in order
    models: OrderedDict = field(default_factory=OrderedDict)  # Serve's LRU: expert -> None, least recent first
    work: deque = field(default_factory=deque)  # sub-batches of the window running: (expert, calls)


@dataclass
class TaskOutcome:
    latencies_ms: list[float]
    makespan_ms: float
    tiers: Tiers
    num_batches: int
    num_calls: int
    num_components: int


class _Task:
    def __init__(self, experts: Mapping[str, SimExpert], requests: Sequence[SimRequest], config: SimConfig,
                 policy: PolicySpec) -> None:
        self.experts, self.requests, self.config, self.policy = experts, requests, config, policy
        self.multiplexed = bool(policy.serve_multiplexed)
        n = config.num_executors(policy)
        sizes = {e: x.num_bytes for e, x in experts.items()}
        if self.multiplexed:
            self.executors = [_Executor(i, deployment=d) for i, d in enumerate(policy.serve_multiplexed)]
            self.deployment_of = {e: i for i, d in enumerate(policy.serve_multiplexed) for e in d.experts}
            largest = max(sizes.values(), default=0)
            pools = [SimPool(d.max_models * largest, d.host_cache_bytes) for d in policy.serve_multiplexed]
        else:
            self.executors = [_Executor(i) for i in range(n)]
            pools = [SimPool(config.pool_budget_bytes(n), config.pool_host_budget_bytes(n)) for _ in range(n)]
        self.tiers = Tiers(pools, sizes, {e: x.usage for e, x in experts.items()})
        self.rng = random.Random(config.seed)
        self.compute_free_ms = [0.0] * config.compute_slots
        self.free_at_ms = {HOST_COPY: 0.0, DISK_READ: 0.0}
        self.events: list[tuple[float, int, int, tuple]] = []
        self.seq = 0
        self.now_ms = 0.0
        self.next_round_robin = 0
        self.latencies_ms: list[float] = []
        self.arrival_ms = [r.arrival_ms for r in requests]  # closed loop: set as each request is sent
        self.next_request = 0  # closed loop: the next request a station sends
        self.end_request = len(requests)
        self.num_batches = self.num_calls = self.num_components = 0
        self.max_batch = {e: x.max_batch for e, x in experts.items()}
        self.upstreams = {e: x.upstreams for e, x in experts.items() if x.upstreams}
        self.left_in_wave: dict[int, int] = {}  # request -> calls of its current wave not answered yet
        self.wave_of: dict[int, int] = {}
        self.executor_of: dict[int, int] = {}
        if config.warm_start:
            self._warm_start()

    # ------------------------------------------------------------------ setup and costs
    def _warm_start(self) -> None:
        """Each pool as a configured host replica holds it: warmed by `experts.tiering.warm_plan` from every expert
        (every replica of a host deployment gets the same experts); a multiplexed replica holds its K most used
        models, its cache the next ones that fit."""
        if not self.multiplexed:
            for i in range(len(self.executors)):
                self.tiers.warm(i, list(self.experts), self.now_ms)
            return
        for x in self.executors:
            d, pool = x.deployment, self.tiers.pools[x.index]
            ranked = sorted(d.experts, key=lambda e: (-self.experts[e].usage, e))
            for rank, e in reversed(list(enumerate(ranked[:d.max_models]))):  # least used first: the LRU end
                x.models[e] = None
                pool.device[e] = (-1e-3 * (rank + 1), -1e-3 * (rank + 1))
                pool.device_used_bytes += self.experts[e].num_bytes
            for e in ranked[d.max_models:]:
                if d.host_cache_bytes is None or pool.host_used_bytes + self.experts[e].num_bytes <= d.host_cache_bytes:
                    pool.host[e] = -1.0
                    pool.host_used_bytes += self.experts[e].num_bytes
            pool.note_peaks()

    def _push(self, at_ms: float, kind: int, data: tuple) -> None:
        heapq.heappush(self.events, (at_ms, self.seq, kind, data))
        self.seq += 1

    def _reserve(self, resource: str, duration_ms: float) -> float:
        """When an operation on `resource` asked for now ends (it waits for the ones asked before); compute takes the
        slot that frees first."""
        if resource == COMPUTE:
            slot = min(range(len(self.compute_free_ms)), key=lambda i: (self.compute_free_ms[i], i))
            end = max(self.now_ms, self.compute_free_ms[slot]) + duration_ms
            self.compute_free_ms[slot] = end
            return end
        start = max(self.now_ms, self.free_at_ms[resource])
        self.free_at_ms[resource] = start + duration_ms
        return start + duration_ms

    def _reserve_load(self, tier: Tier, duration_ms: float) -> float:
        if self.config.loads_use_compute:
            return self._reserve(COMPUTE, duration_ms)
        return self._reserve(HOST_COPY if tier is Tier.HOST else DISK_READ, duration_ms)

    def load_ms(self, expert: str, tier: Tier) -> float:
        x, c = self.experts[expert], self.config
        if tier is Tier.HOST:
            measured, bytes_per_s, fixed = x.load_from_host_ms, c.host_to_device_bytes_per_s, c.host_load_fixed_ms
        else:
            measured, bytes_per_s, fixed = x.load_from_disk_ms, c.disk_bytes_per_s, c.disk_load_fixed_ms
        return measured if measured is not None else fixed + 1000.0 * x.num_bytes / bytes_per_s

    # ------------------------------------------------------------------ the run
    def run(self) -> TaskOutcome:
        stations = self.config.closed_loop_stations
        warm = min(self.config.warmup_requests, len(self.requests)) if stations is not None else 0
        if warm:  # the warm-up to its last answer, then the counters start from zero (the benchmark's reset_stats)
            self._drive(0, warm)
            self.latencies_ms, self.num_batches, self.num_calls, self.num_components = [], 0, 0, 0
            t = self.tiers
            t.loads, t.prefetches, t.evictions, t.demotions_to_host, t.dropped_to_disk = (Counter(), Counter(),
                                                                                          Counter(), 0, 0)
        self._drive(warm, len(self.requests))
        start = min(self.arrival_ms[warm:])
        return TaskOutcome(self.latencies_ms, self.now_ms - start, self.tiers, self.num_batches, self.num_calls,
                           self.num_components)

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
            self._push(self.arrival_ms[i], _ARRIVE, (i,))
        self.next_request = sent
        while self.events:
            self.now_ms, _, kind, data = heapq.heappop(self.events)
            if kind == _ARRIVE:
                self._arrive(data[0])
            elif kind == _LOADED:
                self._run_batch(self.executors[data[0]], data[1])
            elif kind == _DONE:
                self._finish(self.executors[data[0]], data[1], data[2])
            elif kind == _WINDOW:
                self._close_window(self.executors[data[0]], data[1])
            else:
                self._enqueue_wave(data[0])

    def _arrive(self, request: int) -> None:
        self.wave_of[request] = 0
        if not self.multiplexed:
            x = self.executors[self._assign(request)]
            self.executor_of[request] = x.index
            x.in_flight += 1
            if self.config.request_overhead_ms:
                self._reserve(COMPUTE, self.config.request_overhead_ms)
        self._enqueue_wave(request)

    def _enqueue_wave(self, request: int) -> None:
        """The calls of the request's current wave join their executor's queue."""
        calls = self.requests[request].wave(self.wave_of[request])
        self.left_in_wave[request] = len(calls)
        started: set[int] = set()
        for component, expert in calls:
            call = (self.now_ms, request, component, self.wave_of[request])
            if self.multiplexed:
                self._collect(self.executors[self.deployment_of[expert]], call, expert)
            else:
                x = self.executors[self.executor_of[request]]
                x.queue[expert].append(call)
                started.add(x.index)
        for i in sorted(started):
            if not self.executors[i].busy:
                self._start(self.executors[i])

    def _assign(self, request: int) -> int:
        """The executor of a whole request (a host replica runs every call of the plans it is sent)."""
        n = len(self.executors)
        if self.policy.assign is AssignPolicy.SINGLE or n == 1:
            return 0
        if self.policy.assign is AssignPolicy.ROUND_ROBIN:
            i, self.next_round_robin = self.next_round_robin, (self.next_round_robin + 1) % n
            return i
        if self.policy.assign is AssignPolicy.POW2:
            a, b = self.rng.sample(range(n), 2)
            return a if (self.executors[a].in_flight, a) <= (self.executors[b].in_flight, b) else b
        calls = Counter(e for _, e in self.requests[request].wave(0))
        snapshots = []
        for x in self.executors:
            queued = {e: len(q) for e, q in x.queue.items() if q}
            if x.running:
                queued[x.running[0]] = queued.get(x.running[0], 0) + x.running[1]
            snapshots.append(ReplicaSnapshot(str(x.index), queued, frozenset(self.tiers.pools[x.index].device)))
        costs = {e: ExpertCost(s.k_ms_per_item, s.b_ms, self.load_ms(e, Tier.HOST)) for e, s in self.experts.items()}
        return int(rank_replicas(snapshots, calls, costs)[0])

    # ------------------------------------------------------------------ pooled hosts
    def _start(self, x: _Executor) -> None:
        if x.deployment is not None:
            self._start_window(x)
            return
        pool = self.tiers.pools[x.index]
        pick = next_batch(self.policy.arrange, {e: [c[0] for c in q] for e, q in x.queue.items() if q},
                          pool.device.keys(), self.now_ms, max_wait_s=self.config.max_wait_ms,
                          max_batch=self.max_batch)
        if pick is None:
            x.busy, x.running = False, None
            return
        x.busy, x.planned_calls = True, pick.num_calls  # its calls stay queued (and counted so) until the batch runs
        if pick.expert in pool.device:
            self._run_batch(x, pick.expert)
            return
        busy = {e for e, q in x.queue.items() if q and e != pick.expert}
        plan = self.tiers.room(x.index, self.policy.evict, pick.expert, busy=busy, running={pick.expert},
                               upstreams=self.upstreams)
        if plan is None:
            raise ValueError(f"no eviction makes room for {pick.expert} in pool {x.index}; its budget is too small")
        tier = self.tiers.load(x.index, pick.expert, plan, self.now_ms)
        self._push(self._reserve_load(tier, self.load_ms(pick.expert, tier)), _LOADED, (x.index, pick.expert))

    def _run_batch(self, x: _Executor, expert: str) -> None:
        """Run the batch: FCFS runs the calls it picked; arrange takes the expert's calls queued now, split evenly at
        its best batch (as the host's executor); then the prefetch, inside the batch's time."""
        q = x.queue[expert]
        if self.policy.arrange is ArrangePolicy.FCFS:
            n = max(1, min(x.planned_calls, len(q)))
        else:
            n = split_batches(len(q), max(1, self.max_batch[expert]))[0].stop
        batch, x.queue[expert] = q[:n], q[n:]
        x.running = (expert, n)
        self.num_batches += 1
        self.num_calls += n
        duration = self.experts[expert].batch_ms(n) + n * self.config.call_overhead_ms
        others_wait = any(q for e, q in x.queue.items() if q and e != expert)
        if self.policy.prefetch and not others_wait:
            duration += self._prefetch(x, expert, n)
        self._push(self._reserve(COMPUTE, duration), _DONE, (x.index, expert, tuple(batch)))

    def _prefetch(self, x: _Executor, expert: str, num_calls: int) -> float:
        pool = self.tiers.pools[x.index]
        downstream = dict(self.experts[expert].triggers)
        if not downstream:
            return 0.0
        chosen = prefetch(downstream, num_calls, on_device=pool.device, num_bytes=self.tiers.sizes,
                          free_device_bytes=pool.device_budget_bytes - pool.device_used_bytes,
                          min_probability=PREFETCH_MIN_PROBABILITY)
        spent = 0.0
        for d in chosen:
            spent += self.load_ms(d, self.tiers.prefetch_load(x.index, d, self.now_ms))
        return spent

    def _finish(self, x: _Executor, expert: str, batch: tuple[Call, ...]) -> None:
        """The batch's calls are answered; a request whose wave is done queues its next wave (pooled hosts: at once,
        in the same process; multiplexed: the driver's turnaround later) or is answered."""
        pool = self.tiers.pools[x.index]
        if expert in pool.device:
            self.tiers.touch(x.index, expert, self.now_ms)
        x.running = None
        for _, request, _, _ in batch:
            self.left_in_wave[request] -= 1
            if self.left_in_wave[request]:
                continue
            self.wave_of[request] += 1
            if self.requests[request].wave(self.wave_of[request]):
                if self.multiplexed:
                    self._push(self.now_ms + self.config.turnaround_ms, _CALLS, (request,))
                else:
                    self._enqueue_wave(request)
            else:
                self._answered(request)
        x.busy = False
        for y in [x] + [y for y in self.executors if y is not x]:
            if not y.busy:
                self._start(y)

    def _answered(self, request: int) -> None:
        self.latencies_ms.append(self.now_ms - self.arrival_ms[request])
        self.num_components += len(self.requests[request].chains)
        if request in self.executor_of:
            self.executors[self.executor_of[request]].in_flight -= 1
        if self.config.closed_loop_stations is not None and self.next_request < self.end_request:
            i, self.next_request = self.next_request, self.next_request + 1
            self.arrival_ms[i] = self.now_ms + self.config.turnaround_ms
            self._push(self.arrival_ms[i], _ARRIVE, (i,))

    # ------------------------------------------------------------------ Serve multiplexing
    def _collect(self, x: _Executor, call: Call, expert: str) -> None:
        """A call joins the deployment's batch queue: the window being formed, which closes when full."""
        if not x.collecting:
            x.window_id += 1
            self._push(self.now_ms + x.deployment.batch_wait_ms, _WINDOW, (x.index, x.window_id))
        x.collecting.append((call, expert))
        if len(x.collecting) >= x.deployment.max_batch_size:
            self._close_window(x, x.window_id)

    def _close_window(self, x: _Executor, window_id: int) -> None:
        if window_id != x.window_id or not x.collecting:
            return  # closed already (it filled up)
        x.windows.append(x.collecting)
        x.collecting = []
        if not x.busy:
            self._start(x)

    def _start_window(self, x: _Executor) -> None:
        """Run the next sub-batch of the window running, or split the next closed window by model."""
        if not x.work:
            if not x.windows:
                x.busy = False
                return
            window = x.windows.popleft()
            groups: dict[str, list[Call]] = {}
            for call, expert in window:
                groups.setdefault(expert, []).append(call)
            x.work.extend(groups.items())
        x.busy = True
        expert, calls = x.work.popleft()
        duration = self._get_model(x, expert)
        for part in split_batches(len(calls), max(1, self.max_batch[expert])):
            duration += self.experts[expert].batch_ms(part.stop - part.start)
            self.num_batches += 1
        self.num_calls += len(calls)
        duration += len(calls) * self.config.call_overhead_ms
        duration += len({c[1] for c in calls}) * self.config.request_overhead_ms  # one Serve request per request
        x.running = (expert, len(calls))
        self._push(self._reserve(COMPUTE, duration), _DONE, (x.index, expert, tuple(calls)))

    def _get_model(self, x: _Executor, expert: str) -> float:
        """Serve's `get_model`: a hit moves the model to the recent end; a miss evicts the least recently used when
        K are held, then loads (from the load function's host cache, else disk). Worker time spent, ms."""
        d, pool = x.deployment, self.tiers.pools[x.index]
        if expert in x.models:
            x.models.move_to_end(expert)
            pool.device[expert] = (pool.device[expert][0], self.now_ms)
            return 0.0
        spent = 0.0
        while len(x.models) >= d.max_models:
            victim, _ = x.models.popitem(last=False)
            _, used = pool.device.pop(victim)
            pool.device_used_bytes -= self.tiers.sizes[victim]
            self.tiers.evictions["lru"] += 1
            spent += d.unload_ms
            if victim in pool.host:
                self.tiers.demotions_to_host += 1
                pool.host[victim] = used
            elif self._cache(pool, victim, used):
                self.tiers.demotions_to_host += 1
            else:
                self.tiers.dropped_to_disk += 1
        tier = Tier.HOST if expert in pool.host else Tier.DISK
        spent += self.load_ms(expert, tier) + d.load_extra_ms
        x.models[expert] = None
        pool.device[expert] = (self.now_ms, self.now_ms)
        pool.device_used_bytes += self.tiers.sizes[expert]
        if tier is Tier.DISK:
            self._cache(pool, expert, self.now_ms)
        self.tiers.loads[tier] += 1
        pool.note_peaks()
        self.tiers.peak_device_bytes = max(self.tiers.peak_device_bytes,
                                           sum(p.device_used_bytes for p in self.tiers.pools))
        return spent

    def _cache(self, pool: SimPool, expert: str, used_ms: float) -> bool:
        """Keep `expert`'s weights in the load function's host cache, dropping least recently used copies of models
        not held; False when they cannot fit."""
        size, budget = self.tiers.sizes[expert], pool.host_budget_bytes
        if budget is not None and size > budget:
            return False
        while budget is not None and pool.host_used_bytes + size > budget:
            droppable = [e for e in pool.host if e not in pool.device]
            if not droppable:
                return False
            victim = min(droppable, key=lambda e: (pool.host[e], e))
            del pool.host[victim]
            pool.host_used_bytes -= self.tiers.sizes[victim]
            self.tiers.dropped_to_disk += 1
        pool.host[expert] = used_ms
        pool.host_used_bytes += size
        pool.note_peaks()
        return True


def run_task(experts: Mapping[str, SimExpert], requests: Sequence[SimRequest], config: SimConfig,
             policy: PolicySpec) -> TaskOutcome:
    """Every request of one task to the end of its chains; the tiers and counters as they ended."""
    return _Task(experts, requests, config, policy).run()
