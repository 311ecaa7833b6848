"""A pooled host's executor: one queue of expert calls, one batch at a time, within the pool's memory budgets.

CoServe's executor inside a Ray Serve replica. Every call the host's `run` makes (one image for one expert) joins a
queue per expert, whichever router batch it came from. One loop takes the next batch (`experts.arrange.next_batch`:
the same expert's calls together, experts already on the device first, the oldest call after `max_wait_s`, at most
the best batch), makes room for its expert if it is not on the device (`experts.tiering.make_room`: evictions in the
pool's policy, host copies kept within the host budget), loads it (a switch) from host memory or disk, runs it, and,
when no other expert's calls are waiting, loads the likely downstream experts of what just ran into free memory
(`experts.prefetch`: the load uses the time the executor would idle until the dependent calls arrive, and never
delays queued work - on a CPU host a load takes the same cores as inference). Torch work (moves and
inference) runs on the host's single worker thread; the loop and the queue live on the replica's event loop.

Glue only: every decision is a pure policy's. `stats()` counts what the benchmark and the tests read (switches, loads
by tier, evictions by reason, prefetches, peak bytes per tier); the same counts go to the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from expertmesh.errors import ResourceExhausted
from expertmesh.experts.arrange import ArrangePolicy, next_batch
from expertmesh.experts.eviction import EvictionPolicy
from expertmesh.experts.pool import split_batches
from expertmesh.experts.prefetch import prefetch
from expertmesh.experts.revisions import plain_name
from expertmesh.experts.runtime import ExpertRuntime, Prediction, TierMove
from expertmesh.experts.spec import CoESpec
from expertmesh.experts.tiering import PoolSnapshot, WarmPlan, make_room, pool_snapshot, warm_plan
from expertmesh.metrics import Instruments

logger = logging.getLogger("ray.serve")
SLOW_WAIT_S = 5.0  # a call queued longer than this is logged, with the queue


class PoolSettings(BaseModel):
    """How a pooled host uses its memory (the host's user_config; the plan or the benchmark sets it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_budget_bytes: int | None = Field(None, ge=1, description="bytes of expert weights on the device; None: no limit")
    host_budget_bytes: int | None = Field(None, ge=1, description="bytes of host-memory copies; None: no limit")
    arrange: ArrangePolicy = ArrangePolicy.COSERVE
    evict: EvictionPolicy = EvictionPolicy.COSERVE
    max_wait_s: float = Field(0.5, gt=0, le=60, description="a call waiting this long goes next, whatever is resident")
    prefetch: bool = True
    prefetch_min_probability: float = Field(0.5, ge=0, le=1)
    usage: dict[str, float] = Field(default_factory=dict, description="expert -> probability a request calls it")


@dataclass
class _Call:
    arrival_s: float
    pixels_u8: np.ndarray  # [S, S, 3]
    future: asyncio.Future


@dataclass(frozen=True)
class BatchInfo:
    latency_ms: float
    batch_size: int
    readiness: str  # ready | waited_load


class PoolExecutor:
    def __init__(self, spec: CoESpec, runtimes: dict[str, ExpertRuntime], worker: ThreadPoolExecutor,
                 lock: threading.Lock, metrics: Instruments, node: str,
                 on_moves: Callable[[str, list[TierMove], bool], None], clock: Callable[[], float] = time.monotonic):
        self.spec, self.runtimes, self.metrics, self.node = spec, runtimes, metrics, node
        self._worker, self._lock, self._on_moves, self._clock = worker, lock, on_moves, clock
        self.settings = PoolSettings()
        self.max_batch: dict[str, int] = {}
        self._upstreams: dict[str, set[str]] = defaultdict(set)
        self._downstream: dict[str, dict[str, float]] = defaultdict(dict)
        self.learn(spec)
        self._queue: dict[str, list[_Call]] = defaultdict(list)
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._running: frozenset[str] = frozenset()
        self.last_used_s: dict[str, float] = {}
        self._loaded_s: dict[str, float] = {}
        self._prefetched: set[str] = set()  # loaded by a prefetch, not used since
        self.reset_stats()

    # ------------------------------------------------------------------ configuration and stats
    def learn(self, spec: CoESpec) -> None:
        """Take a (keyed) revision's experts and dependency edges: another version of an expert batches as the expert
        does (its profiled size), a new expert as its spec says."""
        for e in spec.experts:
            self.max_batch.setdefault(e.name, self.max_batch.get(plain_name(e.name), e.max_batch))
        for d in spec.dependencies:
            self._upstreams[d.downstream].add(d.upstream)
            self._downstream[d.upstream][d.downstream] = d.trigger_probability if d.trigger_probability is not None else 0.5

    def configure(self, settings: PoolSettings, max_batch: dict[str, int]) -> None:
        self.settings = settings
        self.max_batch.update(max_batch)

    def reset_stats(self) -> None:
        self.counts: Counter[str] = Counter()
        self.loads_by_tier: Counter[str] = Counter()
        self.evictions_by_reason: Counter[str] = Counter()
        self.peak_bytes = {"device": self.device_bytes(), "host": self.host_bytes()}

    def device_bytes(self) -> int:
        return sum(rt.footprint_bytes for rt in self.runtimes.values() if rt.on_device)

    def host_bytes(self) -> int:
        return sum(rt.footprint_bytes for rt in self.runtimes.values() if rt.in_host)

    def stats(self) -> dict:
        return {"switches": self.counts["switches"], "loads_by_tier": dict(self.loads_by_tier),
                "evictions_by_reason": dict(self.evictions_by_reason), "prefetch_loads": self.counts["prefetch_loads"],
                "prefetch_hits": self.counts["prefetch_hits"], "batches": self.counts["batches"],
                "calls": self.counts["calls"], "peak_device_bytes": self.peak_bytes["device"],
                "peak_host_bytes": self.peak_bytes["host"], "device_bytes": self.device_bytes(),
                "host_bytes": self.host_bytes(), "device_budget_bytes": self.settings.device_budget_bytes,
                "host_budget_bytes": self.settings.host_budget_bytes,
                "resident": sorted(e for e, rt in self.runtimes.items() if rt.on_device),
                "queued": {e: len(q) for e, q in self._queue.items() if q}}

    def warm(self, experts: list[str], planned: WarmPlan | None = None) -> list[str]:
        """Load the plan's experts: the tiers the placement planned for this pool (`planned`, by the same rule), else
        `experts.tiering.warm_plan` on this pool's usage - most used first onto the device while the device budget
        holds them, then host-memory copies while its budget lasts. Never past a budget. Runs on the caller's thread
        (reconfigure); returns those put on the device."""
        with self._lock:
            usage = self.settings.usage
            if planned is not None:  # the plan's order first (it ranked by the calls it planned), then the rest
                rank = {e: i for i, e in enumerate([*planned.device, *planned.host])}
                usage = {e: (len(rank) - rank[e]) + 1.0 if e in rank else usage.get(e, 0.0) / 2 for e in experts}
            plan = warm_plan(experts, self._sizes(), usage, device_budget_bytes=self.settings.device_budget_bytes,
                             host_budget_bytes=self.settings.host_budget_bytes,
                             on_device=[e for e, rt in self.runtimes.items() if rt.on_device],
                             in_host=[e for e, rt in self.runtimes.items() if rt.in_host])
        wanted = set(experts)
        for expert in [e for e in plan.device if e in wanted] + [e for e in plan.host if e in wanted]:
            rt = self.runtimes[expert]
            with self._lock:
                if expert in plan.device and not rt.on_device:
                    self._on_moves(expert, rt.load(keep_host_copy=expert in plan.host), False)
                elif expert in plan.host and not rt.in_host and not rt.on_device:
                    move = rt.fetch_to_host()
                    self._on_moves(expert, [move] if move else [], False)
                self._loaded_s.setdefault(expert, self._clock())
                self.last_used_s.setdefault(expert, self._clock())
        self._track_peaks()
        return [e for e in plan.device if e in wanted]

    def _sizes(self) -> dict[str, int]:
        return {e: rt.footprint_bytes for e, rt in self.runtimes.items()}

    @staticmethod
    def _fits(budget: int | None, used: int, rt: ExpertRuntime, already: bool) -> bool:
        return already or budget is None or used + rt.footprint_bytes <= budget

    # ------------------------------------------------------------------ the queue
    async def submit(self, expert: str, pixels_u8: np.ndarray) -> list[tuple[Prediction, BatchInfo]]:
        """Queue one call per row of `pixels_u8` ([N, S, S, 3]) for `expert`; their results, in order."""
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_forever())
        loop = asyncio.get_running_loop()
        now = self._clock()
        calls = [_Call(now, row, loop.create_future()) for row in pixels_u8]
        self._queue[expert].extend(calls)
        self._wakeup.set()
        return list(await asyncio.gather(*(c.future for c in calls)))

    async def _run_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue_not_empty():
                try:
                    await self._run_next()
                except Exception as exc:  # noqa: BLE001 - the loop must outlive any one batch's failure
                    logger.exception("pool executor: picking the next batch failed; failing the queued calls")
                    for q in self._queue.values():
                        for c in q:
                            if not c.future.done():
                                c.future.set_exception(exc)
                        q.clear()

    def _queue_not_empty(self) -> bool:
        return any(self._queue.values())

    async def _run_next(self) -> None:
        pick = next_batch(self.settings.arrange, {e: [c.arrival_s for c in q] for e, q in self._queue.items()},
                          {e for e, rt in self.runtimes.items() if rt.on_device}, self._clock(),
                          max_wait_s=self.settings.max_wait_s, max_batch=self.max_batch)
        if pick is None:
            return
        queue = self._queue[pick.expert]  # even batches: 70 calls by 64 run as 35 + 35, not 64 + 6
        num = min(pick.num_calls, split_batches(len(queue), self.max_batch.get(pick.expert, len(queue)))[0].stop)
        calls = queue[:num]
        del queue[:num]
        self._publish_queue()
        waited_s = self._clock() - calls[0].arrival_s
        if waited_s > SLOW_WAIT_S:
            logger.warning("pool executor: calls of %s waited %.1f s in the queue (%s)", pick.expert, waited_s,
                           {e: len(q) for e, q in self._queue.items() if q})
        queued = frozenset(e for e, q in self._queue.items() if q)  # read here: the loop owns the queue
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._worker, self._run_batch, pick.expert, np.stack([c.pixels_u8 for c in calls]), queued)
        except Exception as exc:  # noqa: BLE001 - every queued call ends in its result or this error
            for c in calls:
                if not c.future.done():
                    c.future.set_exception(exc)
            return
        for c, result in zip(calls, results):
            if not c.future.done():  # the caller may have been cancelled
                c.future.set_result(result)

    def _publish_queue(self) -> None:
        for expert, q in self._queue.items():
            self.metrics.set("expertmesh_host_queue_depth", len(q), node=self.node, expert=expert)

    # ------------------------------------------------------------------ one batch (worker thread)
    def _run_batch(self, expert: str, pixels_u8: np.ndarray, queued: frozenset[str]) -> list[tuple[Prediction, BatchInfo]]:
        t0 = time.perf_counter()
        rt = self.runtimes[expert]
        pixels = rt.pixel_values(pixels_u8)
        with self._lock:
            self._running = frozenset({expert})
            try:
                readiness = "ready"
                if not rt.on_device:
                    self._make_room_and_load(expert, queued)
                    readiness = "waited_load"
                elif expert in self._prefetched:
                    self.counts["prefetch_hits"] += 1
                    self.metrics.inc("expertmesh_expert_prefetches_total", expert=expert, outcome="hit")
                self._prefetched.discard(expert)
                preds = rt.infer(pixels)
                self.last_used_s[expert] = self._clock()
                if self.settings.prefetch and not queued - {expert}:  # idle: nothing else waits for this thread
                    self._prefetch_downstream(expert, len(preds))
            finally:
                self._running = frozenset()
        self.counts["batches"] += 1
        self.counts["calls"] += len(preds)
        self.metrics.inc("expertmesh_expert_requests_total", len(preds), expert=expert, readiness=readiness)
        info = BatchInfo((time.perf_counter() - t0) * 1000.0, len(preds), readiness)
        return [(p, info) for p in preds]

    def _snapshot(self, queued: frozenset[str]) -> PoolSnapshot:
        return pool_snapshot(self._sizes(), [e for e, rt in self.runtimes.items() if rt.on_device],
                             [e for e, rt in self.runtimes.items() if rt.in_host], self.last_used_s, self._loaded_s,
                             self.settings.usage, busy=queued, device_budget_bytes=self.settings.device_budget_bytes,
                             host_budget_bytes=self.settings.host_budget_bytes, running=self._running)

    def _make_room_and_load(self, expert: str, queued: frozenset[str]) -> None:
        rt = self.runtimes[expert]
        plan = make_room(self.settings.evict, self._snapshot(queued), expert, rt.footprint_bytes, in_host=rt.in_host,
                         upstreams=self._upstreams)
        if plan is None:
            raise ResourceExhausted(
                f"expert {expert!r} ({rt.footprint_bytes} bytes) does not fit the pool's device budget of "
                f"{self.settings.device_budget_bytes} bytes", field="device_budget_bytes",
                fix="raise the pool's device budget above the largest expert, or host the expert elsewhere")
        for ev in plan.evictions:
            victim = self.runtimes[ev.expert]
            # no full garbage collection per eviction: it took ~0.2 s and held the GIL (tensors free by reference count)
            move = victim.offload() if victim.in_host else victim.unload(collect=False)
            self._prefetched.discard(ev.expert)
            self.evictions_by_reason[ev.reason.value] += 1
            self.metrics.inc("expertmesh_expert_evictions_total", expert=ev.expert, reason=ev.reason.value)
            if move is not None:
                self.metrics.inc("expertmesh_expert_unloads_total", expert=ev.expert, tier=move.source.value)
        for name in plan.host_drops:
            self.runtimes[name].drop_host_copy()
        self.loads_by_tier["host" if rt.in_host else "disk"] += 1
        self.counts["switches"] += 1
        self._on_moves(expert, rt.load(keep_host_copy=plan.keep_host_copy), True)
        self._loaded_s[expert] = self._clock()
        self._track_peaks()

    def _prefetch_downstream(self, expert: str, num_calls: int) -> None:
        downstream = {d: p for d, p in self._downstream.get(expert, {}).items() if d in self.runtimes}
        if not downstream:
            return
        budget = self.settings.device_budget_bytes
        free = None if budget is None else budget - self.device_bytes()
        on_device = {e for e, rt in self.runtimes.items() if rt.on_device}
        sizes = {d: self.runtimes[d].footprint_bytes for d in downstream}
        chosen = prefetch(downstream, num_calls, on_device=on_device, num_bytes=sizes, free_device_bytes=free,
                          min_probability=self.settings.prefetch_min_probability)
        for d in chosen:
            rt = self.runtimes[d]
            keep = self._fits(self.settings.host_budget_bytes, self.host_bytes(), rt, rt.in_host)
            self.loads_by_tier["host" if rt.in_host else "disk"] += 1
            self._on_moves(d, rt.load(keep_host_copy=keep), False)
            self._loaded_s[d] = self.last_used_s[d] = self._clock()
            self._prefetched.add(d)
            self.counts["prefetch_loads"] += 1
            self.metrics.inc("expertmesh_expert_prefetches_total", expert=d, outcome="loaded")
        if chosen:
            self._track_peaks()

    def _track_peaks(self) -> None:
        device, host = self.device_bytes(), self.host_bytes()
        self.peak_bytes["device"] = max(self.peak_bytes["device"], device)
        self.peak_bytes["host"] = max(self.peak_bytes["host"], host)
        self.metrics.set("expertmesh_host_memory_bytes", device, node=self.node, tier="device")
        self.metrics.set("expertmesh_host_memory_bytes", host, node=self.node, tier="host")
