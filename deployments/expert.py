"""One Ray Serve deployment per expert: loads its checkpoint, classifies dynamically batched images.

Glue only: the model, preprocessing and tier moves are `ExpertRuntime`'s; when idle weights leave the
device is `experts.residency`'s decision (pure), applied here by a background thread. A batch that
finds the weights below the device loads them back first (a switch) and is counted as `waited_load`
- the hit-rate input. A replica running a batch is busy (from preprocessing to its results) and is
never moved down under it. Batch size, batch wait and residency timeouts come from `user_config`, so
they change without a restart. Every result names the node and replica that produced it, for the trace.
The memory budget gauge reports what the node offers experts: its `expertmesh_memory_mib` resource,
read from Ray once per replica (`experts.residency.memory_budget_bytes` decides the number per tier).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve

from expertmesh.cluster.labels import MEMORY_RESOURCE
from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.residency import ResidencyConfig, ResidencySnapshot, decide, memory_budget_bytes
from expertmesh.experts.runtime import ExpertRuntime, Tier, TierMove
from expertmesh.metrics import instruments, node_name
from expertmesh.experts.spec import load_spec, resolve_checkpoint

logger = logging.getLogger("ray.serve")


@serve.deployment
class ExpertDeployment:
    RESIDENCY_TICK_S = 0.25
    GAUGE_REFRESH_S = 2.0  # Ray ages out gauges that are not set again; re-set them well within that

    def __init__(self, spec_path: str | None, expert: str, zoo_root: str) -> None:
        torch.set_num_threads(1)
        spec = load_spec(spec_path)
        self.spec = spec.expert(expert)
        self.runtime = ExpertRuntime(self.spec, resolve_checkpoint(self.spec, Path(zoo_root)), image_limits=spec.image)
        self.metrics = instruments()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node = node_name()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.residency = ResidencyConfig()
        self._lock = threading.Lock()  # held by a batch (load + infer) and by each residency move
        self._batches_running = 0  # changed on the event loop only (classify); read by the residency thread
        self.load_moves = self.runtime.load()
        self._last_used_s = time.monotonic()
        self.budget_bytes = memory_budget_bytes(declared_memory_mib(self.node_id),
                                                machine_bytes=machine_memory_bytes(),
                                                device_bytes=device_memory_bytes(self.runtime.device))
        self._record_moves(self.load_moves, on_demand=False)
        self._publish_gauges()
        self._stop = threading.Event()
        threading.Thread(target=self._residency_loop, name=f"residency-{expert}", daemon=True).start()
        logger.info("expert %s loaded in %.3f s (%d bytes) on node %s", expert,
                    sum(m.seconds for m in self.load_moves), self.runtime.footprint_bytes, self.node_id)

    def reconfigure(self, user_config: dict) -> None:
        self.classify.set_max_batch_size(int(user_config.get("max_batch_size", self.spec.max_batch)))
        self.classify.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.005)))
        self.residency = ResidencyConfig(device_idle_s=user_config.get("device_idle_s"),
                                         host_idle_s=user_config.get("host_idle_s"))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify(self, images: list[np.ndarray]) -> list[dict]:
        """RGB uint8 images [H, W, 3] -> one result dict per image."""
        t0 = time.perf_counter()
        self._batches_running += 1  # busy: the residency thread leaves the weights where they are
        try:
            preds, readiness = await asyncio.to_thread(self._infer, images)
        finally:
            self._batches_running -= 1
        latency_ms = (time.perf_counter() - t0) * 1000.0
        return [{"label": p.label, "score": p.score, "latency_ms": latency_ms, "batch_size": len(images),
                 "readiness": readiness, "node_id": self.node_id, "replica_id": self.replica_id} for p in preds]

    def _infer(self, images: list[np.ndarray]):
        pixels = to_pixel_values(images, self.spec.input_size_px)
        with self._lock:
            readiness = "ready" if self.runtime.tier is Tier.DEVICE else "waited_load"
            if readiness == "waited_load":
                self._record_moves(self.runtime.load(), on_demand=True)
            preds = self.runtime.infer(pixels)
            self._last_used_s = time.monotonic()
        self.metrics.inc("expertmesh_expert_requests_total", len(images), expert=self.spec.name, readiness=readiness)
        return preds, readiness

    # ------------------------------------------------------------------ residency
    def _residency_loop(self) -> None:
        last_refresh_s = time.monotonic()
        while not self._stop.wait(self.RESIDENCY_TICK_S):
            if time.monotonic() - last_refresh_s >= self.GAUGE_REFRESH_S:
                self._publish_gauges()
                last_refresh_s = time.monotonic()
            if not self.residency.enabled:
                continue
            try:
                with self._lock:
                    snap = ResidencySnapshot(self.runtime.tier, self._last_used_s, busy=self._batches_running > 0)
                    target = decide(self.residency, snap, time.monotonic())
                    move = {Tier.HOST: self.runtime.offload, Tier.DISK: self.runtime.unload}[target]() if target else None
                    if move is not None:
                        self.metrics.inc("expertmesh_expert_unloads_total", expert=self.spec.name, tier=move.source.value)
                        self._publish_memory()
            except Exception:  # noqa: BLE001 - a failed move must not kill the thread; the next batch reloads
                logger.exception("residency move of %s failed", self.spec.name)

    def _record_moves(self, moves: list[TierMove], *, on_demand: bool) -> None:
        for m in moves:
            self.metrics.inc("expertmesh_expert_loads_total", expert=self.spec.name, tier=m.target.value)
            self.metrics.observe("expertmesh_expert_load_seconds", m.seconds, expert=self.spec.name, tier=m.target.value)
        if on_demand and moves:
            self.metrics.inc("expertmesh_expert_switches_total", expert=self.spec.name)
        self._publish_memory()

    def _publish_memory(self) -> None:
        for tier in (Tier.HOST, Tier.DEVICE):
            held = self.runtime.footprint_bytes if self.runtime.tier is tier else 0
            self.metrics.set("expertmesh_expert_memory_bytes", held, expert=self.spec.name, node=self.node, tier=tier.value)

    def _publish_gauges(self) -> None:
        self.metrics.set("expertmesh_expert_replicas", 1, expert=self.spec.name, node=self.node)
        self._publish_memory()
        self._publish_budget()

    def _publish_budget(self) -> None:
        for tier, num_bytes in self.budget_bytes.items():
            self.metrics.set("expertmesh_node_memory_budget_bytes", num_bytes, node=self.node, tier=tier.value)

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self.metrics.set("expertmesh_expert_replicas", 0, expert=self.spec.name, node=self.node)
            for tier in (Tier.HOST, Tier.DEVICE):
                self.metrics.set("expertmesh_expert_memory_bytes", 0, expert=self.spec.name, node=self.node, tier=tier.value)

    def info(self) -> dict:
        return {"expert": self.spec.name, "node_id": self.node_id, "node": self.node, "replica_id": self.replica_id,
                "footprint_bytes": self.runtime.footprint_bytes, "tier": self.runtime.tier.value,
                "load_s": sum(m.seconds for m in self.load_moves)}


def declared_memory_mib(node_id: str) -> float | None:
    """This node's `expertmesh_memory_mib` Ray resource (what it offers experts), None where it declares none."""
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node.get("Resources", {}).get(MEMORY_RESOURCE)
    return None


def device_memory_bytes(device: torch.device) -> int | None:
    """A GPU's total memory; None for a CPU device (its memory is the machine's)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def machine_memory_bytes() -> int:
    """The machine's physical memory (the budget's fallback where a node declares none)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
