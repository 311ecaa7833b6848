"""The expert host deployment: one process holds many experts and runs the router's batches of plans.

One torch runtime per process, however many experts: a replica is given the experts the plan puts on its node
(user_config `experts`) and its memory budgets (user_config, else what the node offers: `experts.residency`). It
loads them onto the device until the device budget is full, the rest into host memory while that budget lasts
(each loaded expert answering a warm-up batch before the replica reports ready). It runs a batch of plans in waves
(`router.waves`): every pending call of the batch goes to the pool's executor (`deployments.pool_executor`), which
queues the calls of every batch in flight per expert and runs them in the order the pool's policies choose, loading
(switching) and evicting experts within the budgets. The calls an output triggers run in the same process when their
expert is here too - dependent experts co-located on a node cost no hop at all. Calls for experts held elsewhere
come back pending, for the router to send on. A call for an expert this host was not given (its own node was lost)
loads it on demand, counted as a switch.

Glue only: the policies are pure (`experts.arrange`, `experts.tiering`, `experts.eviction`, `experts.prefetch`, and
`experts.residency` for idle timeouts); torch runs on one worker thread so the event loop keeps taking batches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve

from expertmesh.deployments.memory import declared_memory_mib, device_memory_bytes, machine_memory_bytes
from expertmesh.experts.residency import ResidencyConfig, ResidencySnapshot, decide, memory_budget_bytes
from expertmesh.deployments.pool_executor import PoolExecutor, PoolSettings
from expertmesh.experts.tiering import WarmPlan
from expertmesh.experts.runtime import ExpertRuntime, Tier, TierMove
from expertmesh.experts.revisions import Revision, RevisionSet
from expertmesh.experts.spec import resolve_checkpoint
from expertmesh.metrics import instruments, node_name
from expertmesh.router.plan import Call, ExpertOutput
from expertmesh.router.trace import TraceEntry
from expertmesh.router.waves import PlanInFlight, record, take_calls

logger = logging.getLogger("ray.serve")


@serve.deployment
class ExpertHostDeployment:
    RESIDENCY_TICK_S = 0.25
    GAUGE_REFRESH_S = 2.0  # Ray ages out gauges that are not set again; re-set them well within that

    def __init__(self, spec_path: str | None, zoo_root: str, torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.revisions = RevisionSet(spec_path, zoo_root)
        self.spec = self.revisions.base.spec
        self.runtimes = {e.name: ExpertRuntime(e, resolve_checkpoint(e, Path(zoo_root)), image_limits=self.spec.image)
                         for e in self.spec.experts}
        self.known: frozenset[str] = frozenset()  # the revisions besides the base this host serves (user_config)
        self.metrics = instruments()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node = node_name()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.hosted: frozenset[str] = frozenset()  # the experts the plan gives this host (set by reconfigure)
        self.residency = ResidencyConfig()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")  # torch runs here, one at a time
        self._lock = threading.Lock()  # held by a batch (load + infer) and by each residency move
        self._busy: dict[str, int] = {}  # expert -> batches running (event loop writes, residency thread reads)
        device = next(iter(self.runtimes.values())).device
        self.budget_bytes = memory_budget_bytes(declared_memory_mib(self.node_id), machine_bytes=machine_memory_bytes(),
                                                device_bytes=device_memory_bytes(device))
        self.pool = PoolExecutor(self.spec, self.runtimes, self._worker, self._lock, self.metrics, self.node,
                                 on_moves=self._record_moves)
        self._stop = threading.Event()
        threading.Thread(target=self._residency_loop, name="host-residency", daemon=True).start()

    POOL_KEYS = frozenset(PoolSettings.model_fields)

    def reconfigure(self, user_config: dict) -> None:
        """Host the plan's experts within the pool's budgets (user_config; by default what the node offers), with their
        batch sizes, the pool's policies and the residency timeouts. Serve reports the replica ready only after the
        experts placed on the device are loaded and have each answered a warm-up batch."""
        pool = {k: v for k, v in user_config.items() if k in self.POOL_KEYS}
        pool.setdefault("device_budget_bytes", self.budget_bytes[Tier.DEVICE])
        pool.setdefault("host_budget_bytes", self.budget_bytes[Tier.HOST])
        self.pool.configure(PoolSettings(**pool), {k: int(v) for k, v in (user_config.get("max_batch") or {}).items()})
        self.residency = ResidencyConfig(device_idle_s=user_config.get("device_idle_s"),
                                         host_idle_s=user_config.get("host_idle_s"))
        self._learn_revisions(user_config.get("revisions") or [])
        wanted = [e for e in user_config.get("experts") or [] if e in self.runtimes]
        planned = user_config.get("warm")  # the tiers the plan predicted with (cluster.memory_model)
        t0 = time.perf_counter()
        for expert in self.pool.warm(wanted, WarmPlan(tuple(planned.get("device") or ()), tuple(planned.get("host") or ()))
                                     if planned else None):
            rt = self.runtimes[expert]
            size = rt.spec.input_size_px
            with self._lock:
                rt.infer(rt.pixel_values(np.zeros((1, size, size, 3), np.uint8)))
        self.hosted = frozenset(wanted)
        self._publish_gauges()
        logger.info("host on %s holds %d experts (%d on the device), loaded and warmed in %.2f s", self.node,
                    len(wanted), sum(rt.on_device for rt in self.runtimes.values()), time.perf_counter() - t0)

    def _learn_revisions(self, paths: list[str]) -> None:
        """Serve the revisions at `paths` (spec files) besides the base: each expert version not held yet gets a
        runtime (its weights load on first use, as any pooled expert's); versions no revision uses any more give
        their memory back."""
        for path in paths:
            self._learn(self.revisions.get(path))
        used = {e.name for path in ("", *paths) for e in self.revisions.get(path).spec.experts}
        for key in sorted(set(self.runtimes) - used):
            if self._busy.get(key):
                continue  # a call still runs it; the next change frees it
            with self._lock:
                self.runtimes[key].unload()
        self.known = frozenset(paths)

    def _learn(self, rev: Revision) -> None:
        """Runtimes for the revision's expert versions not held yet. The dict is replaced, never changed in place:
        the residency thread and the pool's worker iterate it without the lock."""
        new = {e.name: ExpertRuntime(e, resolve_checkpoint(e, self.revisions.zoo_root), image_limits=rev.spec.image)
               for e in rev.spec.experts if e.name not in self.runtimes}
        if new:
            self.runtimes = self.pool.runtimes = {**self.runtimes, **new}
        self.pool.learn(rev.spec)

    # ------------------------------------------------------------------ the request path
    async def run(self, images: dict[int, np.ndarray], plans: list[tuple[list[Call], list[str]]],
                  revision: str = "") -> list[dict]:
        """Run a batch of plans: `images` holds row i of every plan at each input size ([N, S, S, 3] uint8), `plans`
        each row's calls to make here and the experts already planned, `revision` the spec revision they follow
        ("": the built spec). Returns per row the calls made (trace entries), the calls left for other hosts, and
        what is planned now."""
        rev = await asyncio.to_thread(self.revisions.get, revision)  # a first load hashes checkpoints: off the loop
        if any(c.expert not in self.runtimes for calls, _ in plans for c in calls):
            self._learn(rev)  # a router that switched before this host learnt the revision: learn it now
        spec = rev.spec
        inflight = {i: PlanInFlight.start(calls, planned) for i, (calls, planned) in enumerate(plans)}
        sent = {c.expert for calls, _ in plans for c in calls}  # sent here: run even if not hosted (a re-route)
        traces: dict[int, list[TraceEntry]] = {i: [] for i in inflight}
        while wave := take_calls(inflight, lambda e: e in self.hosted or e in sent):
            groups = list(wave.items())
            results = await asyncio.gather(*(self._call(expert, images, items) for expert, items in groups))
            for (expert, items), rows in zip(groups, results):
                for (i, call), (pred, info) in zip(items, rows):
                    record(spec, inflight[i], call, ExpertOutput(expert, pred.label, pred.score))
                    traces[i].append(TraceEntry(
                        expert, pred.label, pred.score, call.reason, call.because_of or "", info.latency_ms,
                        info.batch_size, info.readiness, self.node_id, self.replica_id))
        return [{"trace": traces[i], "pending": p.pending, "planned": sorted(p.planned)} for i, p in inflight.items()]

    async def _call(self, expert: str, images: dict[int, np.ndarray], items: list[tuple[int, Call]]) -> list:
        t0 = time.perf_counter()
        rows = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
        self._busy[expert] = self._busy.get(expert, 0) + 1  # busy: the residency thread leaves its weights alone
        try:
            out = await self.pool.submit(expert, images[self.runtimes[expert].spec.input_size_px][rows])
        finally:
            self._busy[expert] -= 1
        self.metrics.observe("expertmesh_expert_latency_seconds", time.perf_counter() - t0, expert=expert)
        for reason, n in Counter(c.reason.value for _, c in items).items():
            self.metrics.inc("expertmesh_expert_invocations_total", n, expert=expert, reason=reason)
        return out

    def stats(self) -> dict:
        """The pool's counters since the last reset (switches, loads by tier, evictions by reason, prefetches, peak bytes
        per tier) and what it holds now: what the memory benchmark and the tests read."""
        return {**self.pool.stats(), "node": self.node, "replica_id": self.replica_id}

    def reset_stats(self) -> dict:
        self.pool.reset_stats()
        return {"replica_id": self.replica_id}

    def record_routing_stats(self) -> dict:
        """What Serve's request router (`deployments.assign_router`) reads about this replica: the experts on its
        device (the calls queued here it counts itself)."""
        return {"resident": sorted(e for e, rt in self.runtimes.items() if rt.on_device)}

    # ------------------------------------------------------------------ residency and gauges
    def _residency_loop(self) -> None:
        last_refresh_s = time.monotonic()
        while not self._stop.wait(self.RESIDENCY_TICK_S):
            if time.monotonic() - last_refresh_s >= self.GAUGE_REFRESH_S:
                self._publish_gauges()
                last_refresh_s = time.monotonic()
            if not self.residency.enabled:
                continue
            for expert, rt in self.runtimes.items():
                try:
                    with self._lock:
                        snap = ResidencySnapshot(rt.tier, self.pool.last_used_s.get(expert, 0.0),
                                                 busy=self._busy.get(expert, 0) > 0)
                        target = decide(self.residency, snap, time.monotonic())
                        move = {Tier.HOST: rt.offload, Tier.DISK: rt.unload}[target]() if target else None
                    if move is not None:
                        self.metrics.inc("expertmesh_expert_unloads_total", expert=expert, tier=move.source.value)
                        self._publish_memory(expert)
                except Exception:  # noqa: BLE001 - a failed move must not kill the thread; the next batch reloads
                    logger.exception("residency move of %s failed", expert)

    def _record_moves(self, expert: str, moves: list[TierMove], on_demand: bool) -> None:
        for m in moves:
            self.metrics.inc("expertmesh_expert_loads_total", expert=expert, tier=m.target.value)
            self.metrics.observe("expertmesh_expert_load_seconds", m.seconds, expert=expert, tier=m.target.value)
        if on_demand and moves:
            self.metrics.inc("expertmesh_expert_switches_total", expert=expert)
        self._publish_memory(expert)

    def _publish_memory(self, expert: str) -> None:
        rt = self.runtimes[expert]
        for tier in (Tier.HOST, Tier.DEVICE):
            held = rt.footprint_bytes if rt.tier is tier else 0
            self.metrics.set("expertmesh_expert_memory_bytes", held, expert=expert, node=self.node, tier=tier.value)

    def _publish_gauges(self) -> None:
        for expert, rt in self.runtimes.items():
            loaded = expert in self.hosted or rt.tier is not Tier.DISK
            self.metrics.set("expertmesh_expert_replicas", 1 if loaded else 0, expert=expert, node=self.node)
            self._publish_memory(expert)
        for tier, num_bytes in self.budget_bytes.items():
            self.metrics.set("expertmesh_node_memory_budget_bytes", num_bytes, node=self.node, tier=tier.value)

    def __del__(self) -> None:
        """Serve calls this on a graceful shutdown: stop the residency thread, report nothing held here any more."""
        stop = getattr(self, "_stop", None)
        if stop is None:
            return
        stop.set()
        for expert in self.runtimes:
            self.metrics.set("expertmesh_expert_replicas", 0, expert=expert, node=self.node)
            for tier in (Tier.HOST, Tier.DEVICE):
                self.metrics.set("expertmesh_expert_memory_bytes", 0, expert=expert, node=self.node, tier=tier.value)

    def info(self) -> dict:
        return {"node_id": self.node_id, "node": self.node, "replica_id": self.replica_id, "hosted": sorted(self.hosted),
                "known": sorted(self.runtimes),
                "resident": {e: rt.tier.value for e, rt in self.runtimes.items() if rt.tier is not Tier.DISK},
                "footprint_bytes": {e: rt.footprint_bytes for e, rt in self.runtimes.items() if rt.tier is not Tier.DISK}}
