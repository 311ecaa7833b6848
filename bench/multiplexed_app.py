"""The memory benchmark's baseline: the experts behind Ray Serve's own model multiplexing, as a user would build it.

One deployment holds up to K experts per replica with `@serve.multiplexed(max_num_models_per_replica=K)`: `get_model`
loads an expert's checkpoint (`ExpertRuntime`, device copy only: Serve's multiplexer has no host-memory tier) and
Serve evicts the least recently used model when a K+1-th is needed. Inference is `@serve.batch` on one method;
Serve splits each batch by multiplexed model id, so a batch holds one expert's calls, and the callers pick the
expert with `handle.options(multiplexed_model_id=expert)`. A request holds one model, so whoever drives it follows a
component's dependency chain itself (one call per expert).

Loads and inference run on one worker thread, one at a time, as on ExpertMesh's pooled host. What Serve does is not
changed; the deployment only counts what happens (loads, evictions, the bytes of the models held, measured from the
loaded tensors) and reports it through `stats()`, the same shape as the pooled host's. A model Serve evicts while a
batch of it is still running is freed when that batch ends (what dropping the last reference does in plain Serve).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve

from expertmesh.experts.models import parameter_bytes
from expertmesh.experts.pool import split_batches
from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.runtime import ExpertRuntime
from expertmesh.experts.spec import load_spec, resolve_checkpoint

MULTIPLEXED_DEPLOYMENT = "MultiplexedExperts"


class LoadedExpert:
    """One expert as Serve's multiplexer holds it. Serve calls `__del__` when it evicts the model (LRU); the weights
    are dropped then, or when the last batch using them ends."""

    def __init__(self, runtime: ExpertRuntime, num_bytes: int, on_free) -> None:
        self.runtime = runtime
        self.num_bytes = num_bytes
        self._on_free = on_free
        self._lock = threading.Lock()
        self._in_flight = 0
        self._evicted = False
        self._freed = False

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def end(self) -> None:
        with self._lock:
            self._in_flight -= 1
            free = self._evicted and self._in_flight == 0
        if free:
            self._free()

    def __del__(self) -> None:
        with self._lock:
            if self._evicted:  # Serve's call, then the interpreter's own finalizer: once is enough
                return
            self._evicted = True
            free = self._in_flight == 0
        if free:
            self._free()

    def _free(self) -> None:
        with self._lock:
            if self._freed:
                return
            self._freed = True
        self.runtime.unload()
        self._on_free(self)


class MultiplexedExpertsBase:
    """Everything but `get_model`, which `multiplexed_deployment` adds with the chosen K."""

    def __init__(self, spec_path: str | None, zoo_root: str, torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.spec = load_spec(spec_path)
        self.zoo_root = Path(zoo_root)
        self.max_batch = {e.name: e.max_batch for e in self.spec.experts}
        self.max_models_per_replica = 0
        self.device_budget_bytes: int | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")  # loads and inference, in turn
        self._lock = threading.Lock()  # the counters below (the event loop and Serve's unload thread write them)
        self._held_bytes = 0
        self._num_held = 0
        self._reset_counters()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def reconfigure(self, user_config: dict) -> None:
        """`max_batch` per expert (the largest is Serve's batch size; each expert's batch is split to its own),
        `batch_wait_s` (Serve's batch_wait_timeout_s), and the K and budget this replica runs under (recorded)."""
        self.max_batch.update({k: int(v) for k, v in (user_config.get("max_batch") or {}).items()})
        self.infer.set_max_batch_size(max(self.max_batch.values()))
        self.infer.set_batch_wait_timeout_s(float(user_config.get("batch_wait_s", 0.01)))
        self.max_models_per_replica = int(user_config.get("max_models_per_replica", 0))
        self.device_budget_bytes = user_config.get("device_budget_bytes")

    async def _load(self, expert: str) -> LoadedExpert:
        """What `get_model` does on a miss: read the checkpoint onto the device (on the worker thread)."""
        spec = self.spec.expert(expert)
        runtime = ExpertRuntime(spec, resolve_checkpoint(spec, self.zoo_root), image_limits=self.spec.image)
        await asyncio.get_running_loop().run_in_executor(self._worker, lambda: runtime.load(keep_host_copy=False))
        loaded = LoadedExpert(runtime, parameter_bytes(runtime.module), self._freed)
        with self._lock:
            self._loads += 1
            self._hold(+1, loaded.num_bytes)
        return loaded

    def _freed(self, loaded: LoadedExpert) -> None:
        with self._lock:
            self._evictions += 1
            self._hold(-1, -loaded.num_bytes)

    def _hold(self, num_models: int, num_bytes: int) -> None:
        """Models and bytes held change (under the lock): the peaks and the time integral of the bytes follow."""
        now = time.monotonic()
        self._byte_seconds += self._held_bytes * (now - self._since_s)
        self._since_s = now
        self._num_held += num_models
        self._held_bytes += num_bytes
        self._peak_bytes = max(self._peak_bytes, self._held_bytes)
        self._peak_held = max(self._peak_held, self._num_held)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def infer(self, images: list[np.ndarray]) -> list[dict]:
        """One batch of one expert's calls (Serve splits batches by multiplexed model id): each image [1, S, S, 3]
        uint8 at the expert's input size -> {"expert", "label", "score"}."""
        expert = serve.get_multiplexed_model_id()
        loaded = await self.get_model(expert)
        loaded.begin()
        try:
            pixels_u8 = np.concatenate(images)
            out: list[dict] = []
            for part in split_batches(len(images), self.max_batch.get(expert, 16)):
                preds = await asyncio.get_running_loop().run_in_executor(
                    self._worker, self._infer_sync, loaded.runtime, pixels_u8[part])
                out += [{"expert": expert, "label": p.label, "score": p.score} for p in preds]
            return out
        finally:
            loaded.end()

    @staticmethod
    def _infer_sync(runtime: ExpertRuntime, pixels_u8: np.ndarray):
        return runtime.infer(to_pixel_values(pixels_u8, runtime.spec.input_size_px))

    def stats(self) -> dict:
        """The pooled host's stats shape: every load here is on demand from disk (a switch), every eviction LRU.
        Also the bytes held on average since the reset (time-weighted) and now."""
        with self._lock:
            self._hold(0, 0)
            elapsed_s = time.monotonic() - self._reset_s
            return {"mean_device_bytes": self._byte_seconds / elapsed_s if elapsed_s > 0 else self._held_bytes,
                    "switches": self._loads, "loads_by_tier": {"disk": self._loads, "host": 0},
                    "evictions_by_reason": {"lru": self._evictions}, "peak_device_bytes": self._peak_bytes,
                    "peak_host_bytes": 0, "device_budget_bytes": self.device_budget_bytes, "host_budget_bytes": 0,
                    "prefetch_hits": 0, "held_bytes": self._held_bytes, "num_models_held": self._num_held,
                    "peak_models_held": self._peak_held, "max_models_per_replica": self.max_models_per_replica,
                    "replica_id": self.replica_id, "node_id": self.node_id}

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_counters()

    def _reset_counters(self) -> None:
        self._loads = 0
        self._evictions = 0
        self._peak_bytes = self._held_bytes
        self._peak_held = self._num_held
        self._reset_s = self._since_s = time.monotonic()
        self._byte_seconds = 0.0


def multiplexed_deployment(max_models_per_replica: int):
    """The deployment with `@serve.multiplexed(max_num_models_per_replica=K)` on `get_model` (K is fixed when the
    decorator runs, so the class is made here)."""
    if max_models_per_replica < 1:
        raise ValueError(f"max_models_per_replica must be >= 1 (got {max_models_per_replica})")

    class MultiplexedExperts(MultiplexedExpertsBase):
        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_model(self, expert: str) -> LoadedExpert:
            return await self._load(expert)

    return serve.deployment(MultiplexedExperts, name=MULTIPLEXED_DEPLOYMENT)
