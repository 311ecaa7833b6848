"""The memory benchmark's systems under test: what each one is, the budgets they share, and deploying them.

Every system serves the same experts on one replica with the same CPUs, max batch sizes and request queue bound,
under the same device budget (a fraction, at most a third, of all the served experts' bytes):
- (a) `expertmesh`: the pooled expert host, CoServe arrange, dependency-aware eviction, prefetch;
- (b) `multiplexed`: Ray Serve's own `@serve.multiplexed` (LRU) + `@serve.batch` (bench/multiplexed_app.py), with K
  models per replica = what the device budget holds (`models_per_replica`: by default the budget over the largest
  expert, the K that never exceeds it); (b') `multiplexed_mean_k` the same with the more generous K of the budget
  over the mean expert's bytes (it holds more than the budget whenever large experts are hot: measured);
- (c) `fcfs_lru`: the pooled host with FCFS and LRU, no prefetch;
- (d) `all_resident`: the pooled host with the budgets lifted (the upper bound);
- the ablation: `evict_only` (FCFS + dependency-aware eviction), `evict_arrange` (+ CoServe arrange, no prefetch),
  then (a) (+ prefetch), then `expertmesh_2x_assign` (+ assign: (a) as two replicas sharing the same CPU and budgets,
  the handle routing with `deployments.assign_router`), beside `expertmesh_2x_pow2` (the same two replicas with
  Serve's default router: what assign itself adds).
The pooled hosts get the host-memory budget too; Serve's multiplexer has no host tier (a load is from disk), so
`expertmesh_no_host_tier` is (a) keeping no host-memory copies: the same memory as (b), loads from disk as (b)'s.

A deployed system answers `send(request)` with the labels of every expert the request's chain ran (the pooled host
runs the chain in-process; for the multiplexed baseline the caller follows it, one call per expert, since a request
to it holds one model), and `stats()` / `reset_stats()` in the pooled host's shape.
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from ray import serve

from expertmesh.bench.multiplexed_app import multiplexed_deployment
from expertmesh.deployments.config import ASSIGN_ROUTER
from expertmesh.deployments.host import ExpertHostDeployment
from expertmesh.experts.spec import CoESpec
from expertmesh.router.plan import Call, ExpertOutput, Reason
from expertmesh.router.waves import PlanInFlight, record, take_calls

HOST = "host"
MULTIPLEXED = "multiplexed"
K_RULES = ("largest", "usage", "mean")
NO_HOST_COPIES_BYTES = 1  # the smallest host budget a pool takes (PoolSettings: >= 1): no expert's copy fits


@dataclass(frozen=True)
class SystemUnderTest:
    name: str
    title: str
    kind: Literal["host", "multiplexed"]
    arrange: str = "coserve"
    evict: str = "coserve"
    prefetch: bool = False
    budgeted: bool = True  # False: the budgets are lifted (every expert resident)
    k_rule: str | None = None  # multiplexed: how K is chosen (None: the run's setting)
    host_tier: bool = True  # a pooled host keeps host-memory copies within the host budget (False: none)
    num_replicas: int = 1  # > 1: the same CPUs and budgets divided among this many host replicas
    request_router: Literal["pow2", "assign"] = "pow2"  # how the handle picks a replica (with num_replicas > 1)


SYSTEMS: dict[str, SystemUnderTest] = {s.name: s for s in (
    SystemUnderTest("all_resident", "(d) all resident (budget lifted)", HOST, budgeted=False),
    SystemUnderTest("expertmesh", "(a) ExpertMesh (arrange + dependency-aware eviction + prefetch)", HOST,
                    prefetch=True),
    SystemUnderTest("multiplexed", "(b) Ray Serve @serve.multiplexed (LRU) + @serve.batch", MULTIPLEXED),
    SystemUnderTest("multiplexed_mean_k", "(b') the same, K = budget / mean expert (may exceed the budget)",
                    MULTIPLEXED, k_rule="mean"),
    SystemUnderTest("expertmesh_no_host_tier", "(a) without the host-memory tier (loads from disk, as (b)'s)", HOST,
                    prefetch=True, host_tier=False),
    SystemUnderTest("fcfs_lru", "(c) FCFS + LRU", HOST, arrange="fcfs", evict="lru"),
    SystemUnderTest("evict_only", "eviction only (FCFS + dependency-aware eviction)", HOST, arrange="fcfs"),
    SystemUnderTest("evict_arrange", "+ arrange (no prefetch)", HOST),
    SystemUnderTest("expertmesh_2x_pow2", "(a) on 2 replicas, half the CPU and budgets each, Serve's power-of-two "
                                          "router", HOST, prefetch=True, num_replicas=2),
    SystemUnderTest("expertmesh_2x_assign", "+ assign: (a) on 2 replicas, half the CPU and budgets each, the assign "
                                            "router", HOST, prefetch=True, num_replicas=2, request_router="assign"),
)}
REFERENCE = "all_resident"  # every other system's labels must equal this one's
# each row adds one mechanism: eviction, arrange, prefetch (= (a)), assign (two executors, as CoServe's last step)
ABLATION = ("evict_only", "evict_arrange", "expertmesh", "expertmesh_2x_assign")


@dataclass(frozen=True)
class Budgets:
    """Per replica (one replica per system here): bytes the device and host memory offer experts."""

    total_expert_bytes: int
    device_bytes: int
    host_bytes: int | None

    def per_replica(self, num_replicas: int) -> Budgets:
        """Each replica's share when `num_replicas` replicas divide these budgets."""
        return Budgets(self.total_expert_bytes, self.device_bytes // num_replicas,
                       None if self.host_bytes is None else self.host_bytes // num_replicas)


def budgets(expert_bytes: Mapping[str, int], device_fraction: float, host_fraction: float | None) -> Budgets:
    """The budgets as fractions of all the served experts' bytes. The device budget must hold the largest expert."""
    if not expert_bytes:
        raise ValueError("no experts to budget for")
    total = sum(expert_bytes.values())
    device = int(total * device_fraction)
    largest = max(expert_bytes, key=expert_bytes.get)
    if device < expert_bytes[largest]:
        raise ValueError(f"a device budget of {device} bytes ({device_fraction:g} of {total}) cannot hold the largest "
                         f"expert {largest!r} ({expert_bytes[largest]} bytes); raise device_budget_fraction")
    host = None if host_fraction is None else int(total * host_fraction)
    return Budgets(total, device, host)


def models_per_replica(budget_bytes: int, expert_bytes: Mapping[str, int], rule: str = "largest",
                       usage: Mapping[str, float] | None = None) -> int:
    """K for `@serve.multiplexed(max_num_models_per_replica=K)`: how many experts the device budget holds. Serve
    counts models, not bytes, and the experts' sizes differ (tiny ResNets and ResNet-18s), so "what the budget holds"
    needs a rule:
    - "largest" (the default, baseline (b)): the budget over the largest expert's bytes - the K that can never hold
      more than the budget, whichever experts LRU keeps (on an accelerator a larger K can run out of memory);
    - "usage": the most used experts, in order of usage, while they fit the budget together (the working set an LRU
      cache would settle on if it kept the hot experts; it may hold more than the budget when large ones are hot);
    - "mean": the budget over the mean expert's bytes (baseline (b'): as many models as the budget holds of the
      average expert; holds more than the budget whenever large experts are hot).
    At least 1, at most every expert."""
    if rule not in K_RULES:
        raise ValueError(f"unknown K rule {rule!r}; use one of {', '.join(K_RULES)}")
    if not expert_bytes:
        raise ValueError("no experts")
    sizes = list(expert_bytes.values())
    if rule == "usage":
        if usage is None:
            raise ValueError("the usage rule needs the experts' usage probabilities (usage=)")
        held, k = 0, 0
        for expert in sorted(expert_bytes, key=lambda e: (-usage.get(e, 0.0), e)):
            if held + expert_bytes[expert] > budget_bytes:
                break
            held, k = held + expert_bytes[expert], k + 1
    else:
        k = math.floor(budget_bytes / (sum(sizes) / len(sizes) if rule == "mean" else max(sizes)))
    return max(1, min(len(sizes), k))


def host_user_config(system: SystemUnderTest, experts: Sequence[str], max_batch: Mapping[str, int], b: Budgets,
                     usage: Mapping[str, float], max_wait_s: float) -> dict:
    """The pooled host's user_config for `system`: every served expert, the budgets (None when lifted), policies."""
    return {"experts": list(experts), "max_batch": dict(max_batch),
            "device_budget_bytes": b.device_bytes if system.budgeted else None,
            "host_budget_bytes": (b.host_bytes if system.host_tier else NO_HOST_COPIES_BYTES) if system.budgeted else None,
            "arrange": system.arrange, "evict": system.evict, "max_wait_s": max_wait_s, "prefetch": system.prefetch,
            "usage": dict(usage)}


@dataclass(frozen=True)
class Deployment:
    """How every system is deployed (the same for all)."""

    spec_path: str
    zoo_root: str
    num_replicas: int
    replica_num_cpus: float
    torch_threads: int
    max_ongoing_requests: int


class DeployedSystem(abc.ABC):
    """One system running as a Serve application of its own; `delete()` takes it down."""

    def __init__(self, system: SystemUnderTest, app_name: str, handle, spec: CoESpec, deploy_s: float) -> None:
        self.system = system
        self.app_name = app_name
        self.handle = handle
        self.spec = spec
        self.deploy_s = deploy_s

    @abc.abstractmethod
    async def send(self, calls: Sequence[str], images: Mapping[int, np.ndarray]) -> dict[str, str]:
        """Run one request (its first calls, each image [1, S, S, 3] per input size) -> expert -> label."""

    async def stats(self) -> dict:
        return await self.handle.stats.remote()

    async def reset_stats(self) -> None:
        await self.handle.reset_stats.remote()

    async def each_replica(self, method: str, max_rounds: int = 50) -> list[dict]:
        """`method`'s answer from every replica (a handle picks the replica, so ask until each has answered)."""
        seen: dict[str, dict] = {}
        n = self.system.num_replicas
        for _ in range(max_rounds):
            for out in await asyncio.gather(*(getattr(self.handle, method).remote() for _ in range(2 * n))):
                seen.setdefault(out["replica_id"], out)
            if len(seen) >= n:
                break
        return list(seen.values())

    def delete(self) -> None:
        serve.delete(self.app_name)


class HostSystem(DeployedSystem):
    SUMMED = ("switches", "prefetch_loads", "prefetch_hits", "batches", "calls", "peak_device_bytes", "peak_host_bytes",
              "device_bytes", "host_bytes", "device_budget_bytes", "host_budget_bytes")

    async def stats(self) -> dict:
        """One replica's stats; with several, their sum (peaks and budgets summed: the system's memory), each
        replica's own under `per_replica` (each within its own budgets is what the budget check asks)."""
        if self.system.num_replicas == 1:
            return await self.handle.stats.remote()
        each = await self.each_replica("stats")
        total = {k: (None if any(r.get(k) is None for r in each) else sum(r[k] for r in each)) for k in self.SUMMED}
        for k in ("loads_by_tier", "evictions_by_reason"):
            total[k] = dict(sum((Counter(r.get(k) or {}) for r in each), Counter()))
        return {**total, "per_replica": each, "num_replicas": len(each)}

    async def reset_stats(self) -> None:
        if self.system.num_replicas == 1:
            await self.handle.reset_stats.remote()
        else:
            await self.each_replica("reset_stats")

    async def send(self, calls: Sequence[str], images: Mapping[int, np.ndarray]) -> dict[str, str]:
        """One `run` of the request's plan: the host runs its dependent calls in-process."""
        plan = [Call(e, Reason.TABLE) for e in calls]
        [row] = await self.handle.run.remote(dict(images), [(plan, list(calls))])
        if row["pending"]:
            raise RuntimeError(f"the host left calls pending: {row['pending']}")
        return {t["expert"]: t["label"] for t in row["trace"]}


class MultiplexedSystem(DeployedSystem):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._by_expert = {e.name: self.handle.options(multiplexed_model_id=e.name) for e in self.spec.experts}

    async def send(self, calls: Sequence[str], images: Mapping[int, np.ndarray]) -> dict[str, str]:
        """The request's chain, followed here: its calls at once, then the calls their outputs trigger, each a Serve
        request to the expert's model (the router's job, done by the caller)."""
        plan = PlanInFlight.start(Call(e, Reason.TABLE) for e in calls)
        while plan.pending:
            wave = take_calls({0: plan})
            outs = await asyncio.gather(*(
                self._by_expert[e].infer.remote(images[self.spec.expert(e).input_size_px]) for e in wave))
            for (expert, [(_, call)]), out in zip(wave.items(), outs):
                record(self.spec, plan, call, ExpertOutput(expert, out["label"], out["score"]))
        return {c.expert: o.label for c, o in plan.done}


def deploy(system: SystemUnderTest, d: Deployment, spec: CoESpec, experts: Sequence[str], b: Budgets,
           usage: Mapping[str, float], *, max_wait_s: float, batch_wait_s: float, k: int,
           costs: Mapping[str, list[float]] | None = None) -> DeployedSystem:
    """Run `system` as the Serve application `mem-<name>` and return it once Serve reports it running (a pooled
    host has loaded and warmed what it starts with by then)."""
    app_name = f"mem-{system.name}"
    max_batch = {e: spec.expert(e).max_batch for e in experts}
    options = {"num_replicas": d.num_replicas, "ray_actor_options": {"num_cpus": d.replica_num_cpus},
               "max_ongoing_requests": d.max_ongoing_requests}
    t0 = time.perf_counter()
    if system.kind == HOST:
        n = system.num_replicas
        config = host_user_config(system, experts, max_batch, b.per_replica(n), usage, max_wait_s)
        options = {**options, "num_replicas": d.num_replicas * n,
                   "ray_actor_options": {"num_cpus": d.replica_num_cpus / n}}
        if system.request_router == "assign":
            options["request_router_config"] = {"request_router_class": ASSIGN_ROUTER,
                                                "request_routing_stats_period_s": 1.0,
                                                "request_router_kwargs": {"costs": dict(costs or {})}}
        app = ExpertHostDeployment.options(name=f"Host-{system.name}", user_config=config, **options).bind(
            d.spec_path, d.zoo_root, d.torch_threads)
        handle = serve.run(app, name=app_name, route_prefix=None)
        return HostSystem(system, app_name, handle, spec, time.perf_counter() - t0)
    config = {"max_batch": max_batch, "batch_wait_s": batch_wait_s, "max_models_per_replica": k,
              "device_budget_bytes": b.device_bytes}
    app = multiplexed_deployment(k).options(user_config=config, **options).bind(
        d.spec_path, d.zoo_root, d.torch_threads)
    handle = serve.run(app, name=app_name, route_prefix=None)
    return MultiplexedSystem(system, app_name, handle, spec, time.perf_counter() - t0)
