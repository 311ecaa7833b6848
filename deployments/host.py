"""The expert host deployment: one process holds many experts and runs the router's batches of plans.

One torch runtime per process, however many experts: a replica loads the experts the plan gives its node
(user_config `experts`, in parallel, each answering a warm-up batch before the replica reports ready) and
runs a batch of plans in waves (`router.waves`): every pending call of the batch grouped by expert, one
inference per expert per wave, and the calls an output triggers run in the same process when their expert
is here too - dependent experts co-located on a node cost no hop at all. Calls for experts held elsewhere
come back pending, for the router to send on. A call for an expert this host does not hold (its own node
was lost) loads it on demand: a load of a few ms, not a new process, counted as a switch.

Glue only: what runs next is `HostQueue`'s (pure, `experts.pool`), when idle weights leave the device is
`experts.residency`'s; inference runs on one worker thread so the event loop keeps taking batches.
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
from expertmesh.experts.pool import split_batches
from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.residency import ResidencyConfig, ResidencySnapshot, decide, memory_budget_bytes
from expertmesh.experts.runtime import ExpertRuntime, Prediction, Tier, TierMove
from expertmesh.experts.spec import load_spec, resolve_checkpoint
from expertmesh.metrics import instruments, node_name
from expertmesh.router.plan import Call, ExpertOutput
from expertmesh.router.waves import PlanInFlight, record, take_calls

logger = logging.getLogger("ray.serve")


@serve.deployment
class ExpertHostDeployment:
    RESIDENCY_TICK_S = 0.25
    GAUGE_REFRESH_S = 2.0  # Ray ages out gauges that are not set again; re-set them well within that

    def __init__(self, spec_path: str | None, zoo_root: str, torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.spec = load_spec(spec_path)
        self.runtimes = {e.name: ExpertRuntime(e, resolve_checkpoint(e, Path(zoo_root)), image_limits=self.spec.image)
                         for e in self.spec.experts}
        self.metrics = instruments()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node = node_name()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.hosted: frozenset[str] = frozenset()  # the experts the plan gives this host (set by reconfigure)
        self.max_batch = {e.name: e.max_batch for e in self.spec.experts}
        self.residency = ResidencyConfig()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")  # torch runs here, one at a time
        self._lock = threading.Lock()  # held by a batch (load + infer) and by each residency move
        self._busy: dict[str, int] = {}  # expert -> batches running (event loop writes, residency thread reads)
        self._last_used_s: dict[str, float] = {}
        device = next(iter(self.runtimes.values())).device
        self.budget_bytes = memory_budget_bytes(declared_memory_mib(self.node_id), machine_bytes=machine_memory_bytes(),
                                                device_bytes=device_memory_bytes(device))
        self._stop = threading.Event()
        threading.Thread(target=self._residency_loop, name="host-residency", daemon=True).start()

    def reconfigure(self, user_config: dict) -> None:
        """Host the plan's experts (loaded in parallel, each warmed up by one batch; Serve reports the replica ready
        only after this returns), with their batch sizes and the residency timeouts."""
        self.max_batch.update({k: int(v) for k, v in (user_config.get("max_batch") or {}).items()})
        self.residency = ResidencyConfig(device_idle_s=user_config.get("device_idle_s"),
                                         host_idle_s=user_config.get("host_idle_s"))
        wanted = [e for e in user_config.get("experts") or [] if e in self.runtimes]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="load") as pool:
            list(pool.map(self._load_and_warm, wanted))
        self.hosted = frozenset(wanted)
        self._publish_gauges()
        logger.info("host on %s holds %d experts, loaded and warmed in %.2f s", self.node, len(wanted),
                    time.perf_counter() - t0)

    def _load_and_warm(self, expert: str) -> None:
        rt = self.runtimes[expert]
        with self._lock:
            self._record_moves(expert, rt.load(), on_demand=False)
        size = rt.spec.input_size_px
        with self._lock:
            rt.infer(to_pixel_values(np.zeros((1, size, size, 3), np.uint8), size))
        self._last_used_s[expert] = time.monotonic()

    # ------------------------------------------------------------------ the request path
    async def run(self, images: dict[int, np.ndarray], plans: list[tuple[list[Call], list[str]]]) -> list[dict]:
        """Run a batch of plans: `images` holds row i of every plan at each input size ([N, S, S, 3] uint8), `plans`
        each row's calls to make here and the experts already planned. Returns per row the calls made (trace
        entries), the calls left for other hosts, and what is planned now."""
        inflight = {i: PlanInFlight.start(calls, planned) for i, (calls, planned) in enumerate(plans)}
        sent = {c.expert for calls, _ in plans for c in calls}  # sent here: run even if not hosted (a re-route)
        traces: dict[int, list[dict]] = {i: [] for i in inflight}
        while wave := take_calls(inflight, lambda e: e in self.hosted or e in sent):
            for expert, items in wave.items():
                for part in split_batches(len(items), self.max_batch.get(expert, 16)):
                    chunk = items[part]
                    rows = np.fromiter((i for i, _ in chunk), dtype=np.int64, count=len(chunk))
                    size = self.runtimes[expert].spec.input_size_px
                    preds, entry = await self._infer(expert, images[size][rows], [c.reason.value for _, c in chunk])
                    for (i, call), pred in zip(chunk, preds):
                        record(self.spec, inflight[i], call, ExpertOutput(expert, pred.label, pred.score))
                        traces[i].append({**entry, "expert": expert, "label": pred.label, "score": pred.score,
                                          "reason": call.reason.value, "because_of": call.because_of or ""})
        return [{"trace": traces[i], "pending": p.pending, "planned": sorted(p.planned)} for i, p in inflight.items()]

    async def _infer(self, expert: str, pixels_u8: np.ndarray, reasons: list[str]) -> tuple[list[Prediction], dict]:
        t0 = time.perf_counter()
        self._busy[expert] = self._busy.get(expert, 0) + 1  # busy: the residency thread leaves its weights alone
        try:
            preds, readiness = await asyncio.get_running_loop().run_in_executor(
                self._worker, self._infer_sync, expert, pixels_u8)
        finally:
            self._busy[expert] -= 1
        seconds = time.perf_counter() - t0
        m = self.metrics
        m.observe("expertmesh_expert_latency_seconds", seconds, expert=expert)
        for reason, n in Counter(reasons).items():
            m.inc("expertmesh_expert_invocations_total", n, expert=expert, reason=reason)
        return preds, {"latency_ms": seconds * 1000.0, "batch_size": len(preds), "readiness": readiness,
                       "node_id": self.node_id, "replica_id": self.replica_id}

    def _infer_sync(self, expert: str, pixels_u8: np.ndarray) -> tuple[list[Prediction], str]:
        rt = self.runtimes[expert]
        pixels = to_pixel_values(pixels_u8, rt.spec.input_size_px)
        with self._lock:
            readiness = "ready" if rt.tier is Tier.DEVICE else "waited_load"
            if readiness == "waited_load":
                self._record_moves(expert, rt.load(), on_demand=True)
            preds = rt.infer(pixels)
            self._last_used_s[expert] = time.monotonic()
        self.metrics.inc("expertmesh_expert_requests_total", len(preds), expert=expert, readiness=readiness)
        return preds, readiness

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
                        snap = ResidencySnapshot(rt.tier, self._last_used_s.get(expert, 0.0),
                                                 busy=self._busy.get(expert, 0) > 0)
                        target = decide(self.residency, snap, time.monotonic())
                        move = {Tier.HOST: rt.offload, Tier.DISK: rt.unload}[target]() if target else None
                    if move is not None:
                        self.metrics.inc("expertmesh_expert_unloads_total", expert=expert, tier=move.source.value)
                        self._publish_memory(expert)
                except Exception:  # noqa: BLE001 - a failed move must not kill the thread; the next batch reloads
                    logger.exception("residency move of %s failed", expert)

    def _record_moves(self, expert: str, moves: list[TierMove], *, on_demand: bool) -> None:
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
                "resident": {e: rt.tier.value for e, rt in self.runtimes.items() if rt.tier is not Tier.DISK},
                "footprint_bytes": {e: rt.footprint_bytes for e, rt in self.runtimes.items() if rt.footprint_bytes}}
