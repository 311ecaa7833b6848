"""The memory benchmark's systems under test: what each one is, the memory they share, and deploying them.

Every system serves the same experts with the same device bytes (of expert weights) and host bytes, the same batch
sizes and request bound, on the same cores (`bench/affinity.py`: the driver runs on the others):
- (a) `expertmesh`: the pooled expert host as the planner configures it - `cluster.memory_model.plan_node` on this
  node's memory and cores, with the profile of the workload's CoE: executors, each one's device and host budgets, the
  tiers it starts with; CoServe arrange, dependency-aware eviction, prefetch, assign across executors;
- (b*) `multiplexed_best`: Ray Serve's `@serve.multiplexed` + `@serve.batch` as a skilled user would configure it
  (bench/multiplexed_app.py, `loader: fast`): the best of the configurations `bench/memory_search.py` tries - one
  deployment per size class or one for all, K chosen by bytes, each class's batch size, the fast loader, a host cache
  of state dicts in the load function, eviction without a garbage collection;
- (b) `multiplexed` and (b') `multiplexed_mean_k`: the earlier baseline, kept as extra rows: one deployment, K = the
  device budget over the largest (b) or the mean (b') expert, `from_pretrained` on every miss, `unload()` with a full
  garbage collection on every eviction, no host cache;
- (c) `fcfs_lru`: the pooled host with FCFS and LRU, no prefetch; (d) `all_resident`: budgets lifted (the bound);
- the ablation: `evict_only` (FCFS + dependency-aware eviction), `evict_arrange` (+ CoServe arrange, no prefetch),
  then (a); and assign's contest: `expertmesh_2x_assign` (two executors, the memory model's budgets for two, the assign
  router) beside `expertmesh_2x_pow2` (the same replicas under Serve's power of two choices).

A deployed system answers `send(request)` with the labels of every expert each of its components ran (the pooled
host runs a whole board's plans in-process in one call; for multiplexing the caller follows the chains, one Serve
request per expert of a wave, carrying every image of that wave for it), and `stats()` / `reset_stats()` in the
pooled host's shape.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from ray import serve

from expertmesh.bench.affinity import runtime_env
from expertmesh.bench.multiplexed_app import multiplexed_deployment
from expertmesh.bench.memory_workload_requests import WorkloadRequest
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
    planned: bool = False  # the memory model configures it (executors, budgets, tiers)
    num_replicas: int = 1  # > 1: the memory model's budgets for this many host replicas
    request_router: Literal["pow2", "assign"] = "pow2"  # how the handle picks a replica (with num_replicas > 1)
    k_rule: str | None = None  # naive multiplexing: how K is chosen (None: the run's setting)
    loader: Literal["fast", "naive"] = "fast"  # multiplexing's load function
    search: bool = False  # multiplexing: the best configuration bench/memory_search.py finds


SYSTEMS: dict[str, SystemUnderTest] = {s.name: s for s in (
    SystemUnderTest("all_resident", "(d) all resident (budgets lifted)", HOST, budgeted=False),
    SystemUnderTest("expertmesh", "(a) ExpertMesh as planned (memory model: executors, budgets, tiers; arrange, "
                                  "dependency-aware eviction, prefetch)", HOST, prefetch=True, planned=True),
    SystemUnderTest("multiplexed_best", "(b*) Ray Serve multiplexing, the best configuration found (K by bytes per "
                                        "size class, fast loader, host cache, no GC)", MULTIPLEXED, search=True),
    SystemUnderTest("multiplexed", "(b) earlier baseline: one multiplexed deployment, K = budget / largest expert, "
                                   "from_pretrained + gc.collect", MULTIPLEXED, loader="naive", k_rule="largest"),
    SystemUnderTest("multiplexed_mean_k", "(b') the same, K = budget / mean expert (may exceed the budget)",
                    MULTIPLEXED, loader="naive", k_rule="mean"),
    SystemUnderTest("fcfs_lru", "(c) FCFS + LRU", HOST, arrange="fcfs", evict="lru"),
    SystemUnderTest("evict_only", "eviction only (FCFS + dependency-aware eviction)", HOST, arrange="fcfs"),
    SystemUnderTest("evict_arrange", "+ arrange (no prefetch)", HOST),
    SystemUnderTest("expertmesh_2x_pow2", "(a) on 2 executors, the same cores, Serve's power-of-two router", HOST,
                    prefetch=True, planned=True, num_replicas=2),
    SystemUnderTest("expertmesh_2x_assign", "+ assign: (a) on 2 executors, the same cores, the assign router", HOST,
                    prefetch=True, planned=True, num_replicas=2, request_router="assign"),
)}
REFERENCE = "all_resident"  # every other system's labels must equal this one's
# each row adds one mechanism: eviction, arrange, prefetch (= (a))
ABLATION = ("fcfs_lru", "evict_only", "evict_arrange", "expertmesh")


@dataclass(frozen=True)
class Budgets:
    """The memory every system gets: bytes of expert weights on the device and in host memory."""

    total_expert_bytes: int
    device_bytes: int
    host_bytes: int | None


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
    """K for one `@serve.multiplexed(max_num_models_per_replica=K)` over experts of mixed sizes: "largest" (the budget
    over the largest expert's bytes: never over the budget), "usage" (the most used experts that fit it together) or
    "mean" (the budget over the mean expert's bytes: over the budget whenever large experts are hot). At least 1, at
    most every expert."""
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
        k = int(budget_bytes // (sum(sizes) / len(sizes) if rule == "mean" else max(sizes)))
    return max(1, min(len(sizes), k))


@dataclass(frozen=True)
class MuxDeployment:
    """One multiplexed deployment of a configuration: its experts, K, host cache bytes, batch size in images."""

    experts: tuple[str, ...]
    max_models: int
    host_cache_bytes: int | None
    batch_max_images: int
    device_bytes: int  # its share of the device budget (what K models of its size hold at most)


@dataclass(frozen=True)
class MuxConfig:
    label: str
    deployments: tuple[MuxDeployment, ...]
    loader: Literal["fast", "naive"] = "fast"

    def to_json(self) -> dict:
        return {"label": self.label, "loader": self.loader,
                "deployments": [{"experts": len(d.experts), "first_experts": list(d.experts[:3]),
                                 "max_models": d.max_models, "host_cache_bytes": d.host_cache_bytes,
                                 "batch_max_images": d.batch_max_images, "device_bytes": d.device_bytes}
                                for d in self.deployments]}


@dataclass(frozen=True)
class HostConfig:
    """A pooled host system's deployment: replicas and each one's user_config budgets and starting tiers."""

    num_replicas: int
    device_budget_bytes: int | None
    host_budget_bytes: int | None
    warm: dict = field(default_factory=dict)  # {"device": [...], "host": [...]} (the plan's tiers) or {}
    reason: str = ""
    max_wait_s: float = 0.5  # arrange's wait bound (the plan's for the workload, every pooled host alike)


def host_user_config(system: SystemUnderTest, cfg: HostConfig, experts: Sequence[str], max_batch: Mapping[str, int],
                     usage: Mapping[str, float]) -> dict:
    """The pooled host's user_config for `system`: every served expert, its budgets and tiers, policies."""
    return {"experts": list(experts), "max_batch": dict(max_batch), "device_budget_bytes": cfg.device_budget_bytes,
            "host_budget_bytes": cfg.host_budget_bytes, "arrange": system.arrange, "evict": system.evict,
            "max_wait_s": cfg.max_wait_s, "prefetch": system.prefetch, "usage": dict(usage),
            **({"warm": cfg.warm} if cfg.warm else {})}


@dataclass(frozen=True)
class Deployment:
    """How every system is deployed (the same for all)."""

    spec_path: str
    zoo_root: str
    replica_num_cpus: float
    torch_threads: int
    max_ongoing_requests: int
    cpus: tuple[int, ...] = ()  # the cores every replica is pinned to (empty: not pinned)


class DeployedSystem(abc.ABC):
    """One system running as Serve applications of its own; `delete()` takes them down."""

    def __init__(self, system: SystemUnderTest, app_names: list[str], handles: list, spec: CoESpec,
                 deploy_s: float) -> None:
        self.system, self.app_names, self.handles, self.spec, self.deploy_s = system, app_names, handles, spec, deploy_s
        self.handle = handles[0]

    @abc.abstractmethod
    async def send(self, request: WorkloadRequest, images: Mapping[int, np.ndarray]) -> dict[str, dict[str, str]]:
        """Run one request (images [N, S, S, 3] per input size, row k component k) -> part id -> expert -> label."""

    async def stats(self) -> dict:
        each = await asyncio.gather(*(h.stats.remote() for h in self.handles))
        return each[0] if len(each) == 1 else summed_stats(each)

    async def reset_stats(self) -> None:
        await asyncio.gather(*(h.reset_stats.remote() for h in self.handles))

    def delete(self) -> None:
        for name in self.app_names:
            serve.delete(name)


SUMMED = ("switches", "prefetch_loads", "prefetch_hits", "batches", "calls", "peak_device_bytes", "peak_host_bytes",
          "device_bytes", "host_bytes", "device_budget_bytes", "host_budget_bytes", "mean_device_bytes")


def summed_stats(each: list[dict]) -> dict:
    """Several replicas' (or deployments') stats as one system's: counters, peaks and budgets summed (the system's
    memory), each one's own under `per_replica` (each within its own budgets is what the budget check asks)."""
    total = {k: (None if any(r.get(k) is None for r in each) else sum(r[k] for r in each))
             for k in SUMMED if any(k in r for r in each)}
    for k in ("loads_by_tier", "evictions_by_reason"):
        total[k] = dict(sum((Counter(r.get(k) or {}) for r in each), Counter()))
    return {**total, "per_replica": each, "num_replicas": len(each)}


class HostSystem(DeployedSystem):
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

    async def stats(self) -> dict:
        if self.system.num_replicas == 1:
            return await self.handle.stats.remote()
        return summed_stats(await self.each_replica("stats"))

    async def reset_stats(self) -> None:
        if self.system.num_replicas == 1:
            await self.handle.reset_stats.remote()
        else:
            await self.each_replica("reset_stats")

    async def send(self, request: WorkloadRequest, images: Mapping[int, np.ndarray]) -> dict[str, dict[str, str]]:
        """One `run` of every component's plan: the host runs the dependent calls in-process."""
        plans = [([Call(e, Reason.TABLE) for e in p.calls], list(p.calls)) for p in request.parts]
        rows = await self.handle.run.remote(dict(images), plans)
        out = {}
        for k, row in enumerate(rows):
            if row["pending"]:
                raise RuntimeError(f"the host left calls pending: {row['pending']}")
            out[request.part_id(k)] = {t.expert: t.label for t in row["trace"]}
        return out


class MultiplexedSystem(DeployedSystem):
    def __init__(self, *args, config: MuxConfig, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config = config
        self._by_expert = {e: (self.handles[i].options(multiplexed_model_id=e), d.batch_max_images)
                           for i, d in enumerate(config.deployments) for e in d.experts}

    async def send(self, request: WorkloadRequest, images: Mapping[int, np.ndarray]) -> dict[str, dict[str, str]]:
        """Every component's chain, followed here wave by wave: per wave, one Serve request per expert (at most its
        deployment's batch of images each) carrying every image of the wave it takes (the router's job, done by the
        caller: a request holds one model)."""
        plans = {k: PlanInFlight.start(Call(e, Reason.TABLE) for e in p.calls) for k, p in enumerate(request.parts)}
        while wave := take_calls(plans):
            sends = []
            for expert, items in wave.items():
                handle, most = self._by_expert[expert]
                rows = images[self.spec.expert(expert).input_size_px]
                for start in range(0, len(items), most):
                    chunk = items[start:start + most]
                    idx = np.fromiter((k for k, _ in chunk), dtype=np.int64, count=len(chunk))
                    sends.append((expert, chunk, handle.infer.remote(rows[idx])))
            outs = await asyncio.gather(*(s[2] for s in sends))
            for (expert, chunk, _), out in zip(sends, outs):
                for (k, call), o in zip(chunk, out):
                    record(self.spec, plans[k], call, ExpertOutput(expert, o["label"], o["score"]))
        return {request.part_id(k): {c.expert: o.label for c, o in plan.done} for k, plan in plans.items()}


def deploy_host(system: SystemUnderTest, d: Deployment, spec: CoESpec, experts: Sequence[str], cfg: HostConfig,
                usage: Mapping[str, float], *, costs: Mapping[str, list[float]] | None = None) -> HostSystem:
    """Run a pooled host `system` as the Serve application `mem-<name>` and return it once Serve reports it running
    (it has loaded and warmed what it starts with by then)."""
    app_name = f"mem-{system.name}"
    max_batch = {e: spec.expert(e).max_batch for e in experts}
    options = {"num_replicas": cfg.num_replicas, "max_ongoing_requests": d.max_ongoing_requests,
               "ray_actor_options": {"num_cpus": d.replica_num_cpus / cfg.num_replicas,
                                     "runtime_env": runtime_env(d.cpus)}}
    if system.request_router == "assign" and cfg.num_replicas > 1:
        options["request_router_config"] = {"request_router_class": ASSIGN_ROUTER, "request_routing_stats_period_s": 1.0,
                                            "request_router_kwargs": {"costs": dict(costs or {})}}
    t0 = time.perf_counter()
    config = host_user_config(system, cfg, experts, max_batch, usage)
    app = ExpertHostDeployment.options(name=f"Host-{system.name}", user_config=config, **options).bind(
        d.spec_path, d.zoo_root, d.torch_threads)
    handle = serve.run(app, name=app_name, route_prefix=None)
    return HostSystem(system, [app_name], [handle], spec, time.perf_counter() - t0)


def deploy_multiplexed(system: SystemUnderTest, d: Deployment, spec: CoESpec, mux: MuxConfig, *,
                       batch_wait_s: float, name: str | None = None) -> MultiplexedSystem:
    """Run a multiplexing configuration as one Serve application per deployment, `mem-<name>-<i>`."""
    name = name or system.name
    names, handles = [], []
    t0 = time.perf_counter()
    share = len(mux.deployments)
    for i, dep in enumerate(mux.deployments):
        app_name = f"mem-{name}-{i}"
        config = {"max_batch": {e: spec.expert(e).max_batch for e in dep.experts},
                  "batch_max_images": dep.batch_max_images, "batch_wait_s": batch_wait_s,
                  "max_models_per_replica": dep.max_models, "device_budget_bytes": dep.device_bytes,
                  "host_cache_bytes": dep.host_cache_bytes, "loader": mux.loader}
        options = {"num_replicas": 1, "max_ongoing_requests": d.max_ongoing_requests, "user_config": config,
                   "ray_actor_options": {"num_cpus": d.replica_num_cpus / share, "runtime_env": runtime_env(d.cpus)}}
        app = multiplexed_deployment(dep.max_models, name=f"Mux-{name}-{i}").options(**options).bind(
            d.spec_path, d.zoo_root, d.torch_threads)
        handles.append(serve.run(app, name=app_name, route_prefix=None))
        names.append(app_name)
    return MultiplexedSystem(system, names, handles, spec, time.perf_counter() - t0, config=mux)
