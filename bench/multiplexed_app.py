"""The memory benchmark's baseline: the experts behind Ray Serve's own model multiplexing, as a skilled user builds it.

A deployment holds up to K experts per replica with `@serve.multiplexed(max_num_models_per_replica=K)`; Serve evicts
the least recently used model when a K+1-th is needed. Inference is `@serve.batch` on one method (a request carries
one expert's images, `batch_size_fn` counts images, Serve splits each batch by multiplexed model id), and the callers
pick the expert with `handle.options(multiplexed_model_id=expert)`. A request holds one model, so whoever drives it
follows a component's dependency chain itself. Several such deployments can divide the experts (one per size class:
each with its own K and batch size, so K counts models of one size and bytes decide it).

Two load functions (user_config `loader`):
- `fast` (what a skilled user writes, and the baseline the contest is run against): one `ExpertRuntime` kept per
  expert across loads, so a load copies the weights into the model's kept skeleton - the same fast loader ExpertMesh
  uses - from a host-memory copy when the load function's cache holds one (a cache of state dicts bounded by
  `host_cache_bytes`, least recently used dropped first), else from disk; an eviction moves the weights back to that
  cache (`offload`) with no garbage collection;
- `naive` (the earlier baseline, kept as extra rows): a new runtime per load, built with `from_pretrained`, and
  `unload()` with its full garbage collection on eviction; no host cache.

Loads and inference run on one worker thread, one at a time, as on ExpertMesh's pooled host. What Serve does is not
changed; the deployment only counts what happens (loads by tier, evictions, the bytes of the models held) and reports
it through `stats()`, the same shape as the pooled host's. A model Serve evicts while a batch of it is still running
is moved out when that batch ends (what dropping the last reference does in plain Serve).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve

from expertmesh.experts.pool import split_batches
from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.runtime import ExpertRuntime
from expertmesh.experts.spec import load_spec, resolve_checkpoint

MULTIPLEXED_DEPLOYMENT = "MultiplexedExperts"
LOADERS = ("fast", "naive")


def images_in(items: list[np.ndarray]) -> int:
    """@serve.batch's batch_size_fn: a request carries [n, S, S, 3] images of one expert."""
    return sum(len(x) for x in items)


class LoadedExpert:
    """One expert as Serve's multiplexer holds it. Serve calls `__del__` when it evicts the model (LRU); the weights
    move out then, or when the last batch using them ends."""

    def __init__(self, runtime: ExpertRuntime, on_free) -> None:
        self.runtime = runtime
        self.num_bytes = runtime.footprint_bytes
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
        self.host_cache_bytes: int | None = None
        self.loader = "fast"
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")  # loads and inference, in turn
        self._lock = threading.Lock()  # the counters and the cache (the event loop and Serve's unload thread write)
        self._runtimes: dict[str, ExpertRuntime] = {}  # fast loader: kept across loads (skeleton + cached copy)
        self._cache: OrderedDict[str, None] = OrderedDict()  # experts with a host copy, least recently used first
        self._held_bytes = 0
        self._num_held = 0
        self._reset_counters()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def reconfigure(self, user_config: dict) -> None:
        """`max_batch` per expert (each expert's batch is split to its own), `batch_max_images` (Serve's batch size, in
        images), `batch_wait_s` (its batch_wait_timeout_s), `loader` (fast | naive), `host_cache_bytes` (fast: the
        load function's host copies; none: no limit), and the K and device budget this replica runs under."""
        self.max_batch.update({k: int(v) for k, v in (user_config.get("max_batch") or {}).items()})
        self.infer.set_max_batch_size(int(user_config.get("batch_max_images") or max(self.max_batch.values())))
        self.infer.set_batch_wait_timeout_s(float(user_config.get("batch_wait_s", 0.01)))
        self.max_models_per_replica = int(user_config.get("max_models_per_replica", 0))
        self.device_budget_bytes = user_config.get("device_budget_bytes")
        self.host_cache_bytes = user_config.get("host_cache_bytes")
        self.loader = user_config.get("loader", "fast")
        if self.loader not in LOADERS:
            raise ValueError(f"loader {self.loader!r}; fix: use one of {', '.join(LOADERS)}")

    # ------------------------------------------------------------------ loading (what get_model does on a miss)
    async def _load(self, expert: str) -> LoadedExpert:
        def timed(load) -> float:  # on the worker: the load itself, not the wait for the worker
            t0 = time.perf_counter()
            load()
            return time.perf_counter() - t0
        if self.loader == "naive":
            spec = self.spec.expert(expert)
            tier = "disk"
            runtime = None

            def build_and_load() -> None:
                nonlocal runtime
                runtime = ExpertRuntime(spec, resolve_checkpoint(spec, self.zoo_root), image_limits=self.spec.image)
                runtime.load(keep_host_copy=False)
            seconds = await asyncio.get_running_loop().run_in_executor(self._worker, timed, build_and_load)
        else:
            runtime = self._runtime(expert)
            tier = "host" if runtime.in_host else "disk"
            seconds = await asyncio.get_running_loop().run_in_executor(
                self._worker, timed, lambda: runtime.load(keep_host_copy=True))
            with self._lock:
                self._cache[expert] = None
                self._cache.move_to_end(expert)
                self._trim_cache()
        loaded = LoadedExpert(runtime, self._freed)
        with self._lock:
            self._loads[tier] += 1
            self._load_s += seconds
            self._hold(+1, loaded.num_bytes)
        return loaded

    def _runtime(self, expert: str) -> ExpertRuntime:
        if expert not in self._runtimes:
            spec = self.spec.expert(expert)
            self._runtimes[expert] = ExpertRuntime(spec, resolve_checkpoint(spec, self.zoo_root),
                                                   image_limits=self.spec.image)
        return self._runtimes[expert]

    def _freed(self, loaded: LoadedExpert) -> None:
        """Serve evicted the model: the fast loader moves its weights back to the host cache (no collection), the
        naive one drops them with a full garbage collection."""
        t0 = time.perf_counter()
        if self.loader == "naive":
            loaded.runtime.unload()
        else:
            loaded.runtime.offload()
        with self._lock:
            self._unload_s += time.perf_counter() - t0
            self._evictions += 1
            self._hold(-1, -loaded.num_bytes)
            if self.loader == "fast":
                self._trim_cache()
                self._peak_cache = max(self._peak_cache, self._cache_bytes())

    def _trim_cache(self) -> None:
        """Drop the least recently used host copies until the cache fits its budget (under the lock); the copies of
        models held on the device go last."""
        if self.host_cache_bytes is None:
            return
        held = lambda e: self._runtimes[e].on_device  # noqa: E731
        for pass_on_device in (False, True):
            for e in list(self._cache):
                if self._cache_bytes() <= self.host_cache_bytes:
                    return
                if held(e) is pass_on_device:
                    self._runtimes[e].drop_host_copy()
                    del self._cache[e]
                    self._dropped += 1

    def _cache_bytes(self) -> int:
        return sum(self._runtimes[e].footprint_bytes for e in self._cache if self._runtimes[e].in_host)

    def _hold(self, num_models: int, num_bytes: int) -> None:
        """Models and bytes held change (under the lock): the peaks and the time integral of the bytes follow."""
        now = time.monotonic()
        self._byte_seconds += self._held_bytes * (now - self._since_s)
        self._since_s = now
        self._num_held += num_models
        self._held_bytes += num_bytes
        self._peak_bytes = max(self._peak_bytes, self._held_bytes)
        self._peak_held = max(self._peak_held, self._num_held)

    # ------------------------------------------------------------------ inference
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=images_in)
    async def infer(self, images: list[np.ndarray]) -> list[list[dict]]:
        """One batch of one expert's requests (Serve splits batches by multiplexed model id), each [n, S, S, 3] uint8
        at the expert's input size -> per request, per image {"expert", "label", "score"}."""
        expert = serve.get_multiplexed_model_id()
        loaded = await self.get_model(expert)
        loaded.begin()
        try:
            pixels_u8 = np.concatenate(images)
            flat: list[dict] = []
            for part in split_batches(len(pixels_u8), self.max_batch.get(expert, 16)):
                preds = await asyncio.get_running_loop().run_in_executor(
                    self._worker, self._infer_sync, loaded.runtime, pixels_u8[part])
                flat += [{"expert": expert, "label": p.label, "score": p.score} for p in preds]
            out, start = [], 0
            for x in images:
                out.append(flat[start:start + len(x)])
                start += len(x)
            return out
        finally:
            loaded.end()

    @staticmethod
    def _infer_sync(runtime: ExpertRuntime, pixels_u8: np.ndarray):
        return runtime.infer(to_pixel_values(pixels_u8, runtime.spec.input_size_px, runtime.processing))

    def stats(self) -> dict:
        """The pooled host's stats shape: every load here is on demand (a switch), from the host cache or disk, every
        eviction LRU. Also the bytes held on average since the reset (time-weighted) and now."""
        with self._lock:
            self._hold(0, 0)
            elapsed_s = time.monotonic() - self._reset_s
            return {"mean_device_bytes": self._byte_seconds / elapsed_s if elapsed_s > 0 else self._held_bytes,
                    "switches": sum(self._loads.values()), "loads_by_tier": dict(self._loads),
                    "evictions_by_reason": {"lru": self._evictions}, "host_copies_dropped": self._dropped,
                    "peak_device_bytes": self._peak_bytes, "peak_host_bytes": self._peak_cache,
                    "device_budget_bytes": self.device_budget_bytes, "host_budget_bytes": self.host_cache_bytes,
                    "prefetch_hits": 0, "held_bytes": self._held_bytes, "num_models_held": self._num_held,
                    "peak_models_held": self._peak_held, "max_models_per_replica": self.max_models_per_replica,
                    "loader": self.loader, "replica_id": self.replica_id, "node_id": self.node_id,
                    "load_ms_mean": 1000.0 * self._load_s / max(1, sum(self._loads.values())),
                    "unload_ms_mean": 1000.0 * self._unload_s / max(1, self._evictions)}

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_counters()

    def _reset_counters(self) -> None:
        self._load_s = self._unload_s = 0.0
        self._loads = {"host": 0, "disk": 0}
        self._evictions = 0
        self._dropped = 0
        self._peak_bytes = self._held_bytes
        self._peak_held = self._num_held
        self._peak_cache = self._cache_bytes() if self._runtimes else 0
        self._reset_s = self._since_s = time.monotonic()
        self._byte_seconds = 0.0

    def note_cache_peak(self) -> None:
        with self._lock:
            self._peak_cache = max(self._peak_cache, self._cache_bytes())


def multiplexed_deployment(max_models_per_replica: int, name: str = MULTIPLEXED_DEPLOYMENT):
    """The deployment with `@serve.multiplexed(max_num_models_per_replica=K)` on `get_model` (K is fixed when the
    decorator runs, so the class is made here)."""
    if max_models_per_replica < 1:
        raise ValueError(f"max_models_per_replica must be >= 1 (got {max_models_per_replica})")

    class MultiplexedExperts(MultiplexedExpertsBase):
        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_model(self, expert: str) -> LoadedExpert:
            loaded = await self._load(expert)
            self.note_cache_peak()
            return loaded

    return serve.deployment(MultiplexedExperts, name=name)
