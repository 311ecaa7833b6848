"""`expertmesh bench memory`, the run: every system under test (bench/memory_systems.py) on one local Ray node, one
after the other, on the same pinned cores, driven by the same seeded requests from this process through Serve handles,
on two workloads.

The workload (bench/memory_workload.py) is a larger PCB CoE (small and ResNet-18-class experts), built once into a
directory that later runs reuse, and two seeded request streams: `components` (each request one component: a
station, a category, its expert calls) and `boards` (CoServe's tasks: each request a board of many components across
many categories and chains, from several stations at once). Before the systems run:
- the workload's CoE is profiled on this machine when no current profile exists (its zoo's profile.json), and the
  memory model (`cluster.memory_model.plan_node`) plans ExpertMesh's node from it: the same code `expertmesh plan`
  runs, on this node's memory and cores;
- per workload, the strongest Serve multiplexing configuration is searched (`bench/memory_search.py`: each candidate
  deployed and measured on a short closed loop; the best is (b*)).
Per system and workload: deploy, warm up (closed loop), a closed loop, an open-loop sweep for the highest rate whose
p99 holds the bound, delete. Every answer is kept per component and checked against the all-resident run's.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from expertmesh.bench.affinity import pin_threads, split_cores
from expertmesh.bench.memory_drive import closed_loop, measure
from expertmesh.bench.memory_search import candidates
from expertmesh.bench.memory_systems import (ABLATION, REFERENCE, SYSTEMS, Budgets, Deployment, HostConfig, MuxConfig,
                                             MuxDeployment, SystemUnderTest, budgets, deploy_host, deploy_multiplexed,
                                             models_per_replica)
from expertmesh.bench.memory_table import headline, label_check
from expertmesh.bench.memory_workload import (MemoryWorkloadConfig, build_workload_coe, default_workload_dir,
                                              expert_bytes, make_requests, request_images)
from expertmesh.bench.memory_workload_requests import WorkloadRequest, make_boards
from expertmesh.bench.provenance import provenance
from expertmesh.bench.throughput_run import say
from expertmesh.cluster.connect import keep_ray_on_loopback
from expertmesh.cluster.costs import ExpertCost
from expertmesh.cluster.demand import expert_cost
from expertmesh.cluster.memory_model import NodeMemory, NodePlan, plan_node, predict
from expertmesh.experts.graph import usage_probabilities
from expertmesh.experts.spec import CoESpec, default_zoo_root, load_spec
from expertmesh.profiler.measure import MeasureConfig
from expertmesh.profiler.run import profile_zoo
from expertmesh.profiler.serving_profiles import serving_devices, usable_profiles
from expertmesh.profiler.store import ProfileStore
from expertmesh.profiler.usage import from_spec

WORKLOADS = ("components", "boards")


class MemorySettings(BaseModel):
    """Every knob of a run (recorded in its JSON). `quick()` is the short version the test suite runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # the workload CoE
    num_small_experts: int = Field(40, ge=1)
    num_large_experts: int = Field(8, ge=0, description="ResNet-18-class experts")
    input_size_px: int = Field(64, ge=16)
    workload_seed: int = 0
    workload_dir: str | None = Field(None, description="where the workload CoE is built (and reused); default "
                                                       "$EXPERTMESH_HOME/bench/memory-coe[-<sizes>]")
    request_seed: int = 1
    zipf_s: float = Field(1.1, gt=0, description="skew of the category mix (Zipf exponent)")
    workloads: tuple[Literal["components", "boards"], ...] = WORKLOADS
    # components: one component per request
    num_stations: int = Field(8, ge=1, description="stations of the components workload: its closed loop's concurrency")
    warmup_requests: int = Field(100, ge=0)
    closed_requests: int = Field(600, ge=1)
    num_requests: int = Field(3000, ge=1, description="the seeded request list; open-loop points cycle through it")
    target_p99_ms: float = Field(1000.0, gt=0, description="the components workload's open-loop p99 bound")
    # boards: many components per request
    components_per_board: int = Field(32, ge=1)
    board_stations: int = Field(4, ge=1, description="stations of the boards workload (boards in flight)")
    board_warmup: int = Field(8, ge=0)
    board_closed: int = Field(48, ge=1)
    board_requests: int = Field(240, ge=1)
    board_target_p99_ms: float = Field(4000.0, gt=0, description="the boards workload's open-loop p99 bound")
    # memory, per system
    device_budget_fraction: float = Field(1 / 3, gt=0, le=1, description="device bytes of expert weights, of all")
    host_budget_fraction: float | None = Field(2 / 3, gt=0, description="host bytes of expert copies, of all "
                                                                        "(None: no limit)")
    k_rule: Literal["largest", "usage", "mean"] = Field("largest", description="(b)'s K (the earlier baseline)")
    multiplexed_k: int | None = Field(None, ge=1, description="K of (b) given outright (overrides k_rule)")
    search_requests: int = Field(60, ge=1, description="closed-loop requests per multiplexing candidate")
    # deployment (the same for every system)
    system_cores: int = Field(1, ge=1, description="cores every system runs on (pinned); the driver gets the rest")
    replica_num_cpus: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(256, ge=1, description="per replica, every system")
    batch_wait_s: float = Field(0.01, ge=0, description="Serve's batch_wait_timeout_s for the multiplexed baselines")
    profile_runs: int = Field(5, ge=1, description="timed runs per batch size when the workload must be profiled")
    # the open-loop sweep
    open_start_fraction: float = Field(0.5, gt=0)
    point_s: float = Field(10.0, gt=0, description="seconds of sending per open-loop point (at least min_requests)")
    min_requests: int = Field(100, ge=1, description="components-workload requests per open-loop point, at least")
    board_min_requests: int = Field(20, ge=1, description="boards per open-loop point, at least")
    max_ramp_points: int = Field(4, ge=1)
    max_fill_points: int = Field(1, ge=0)
    deadline_s: float = Field(120.0, gt=0, description="per request")
    parts: tuple[Literal["closed", "open"], ...] = ("closed", "open")
    systems: tuple[str, ...] = tuple(SYSTEMS)

    @field_validator("systems")
    @classmethod
    def _known_systems(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(SYSTEMS))
        if unknown:
            raise ValueError(f"unknown systems {unknown}; choose among {', '.join(SYSTEMS)}")
        return tuple(n for n in SYSTEMS if n in v)  # the reference runs first

    @classmethod
    def quick(cls, **overrides) -> MemorySettings:
        # three of the quick CoE's experts are 97% of its bytes: a budget of 3/4 leaves two executors room for one each
        return cls(**{"num_small_experts": 6, "num_large_experts": 3, "num_stations": 4, "warmup_requests": 10,
                      "device_budget_fraction": 0.75, "closed_requests": 40, "num_requests": 200,
                      "components_per_board": 6, "board_stations": 2, "board_warmup": 2, "board_closed": 8,
                      "board_requests": 40, "search_requests": 8, "profile_runs": 2, "point_s": 1.0,
                      "min_requests": 20, "board_min_requests": 4, "max_ramp_points": 1, "max_fill_points": 0,
                      "deadline_s": 60.0, **overrides})

    def workload_config(self) -> MemoryWorkloadConfig:
        return MemoryWorkloadConfig(num_small_experts=self.num_small_experts, num_large_experts=self.num_large_experts,
                                    input_size_px=self.input_size_px, seed=self.workload_seed)

    def workload_path(self) -> Path:
        """The workload's directory: the workload module's default for the default CoE, a sibling named by the sizes
        for another (a build is stamped with its config, so two configs in one directory would rebuild each other)."""
        if self.workload_dir:
            return Path(self.workload_dir)
        config = self.workload_config()
        if config == MemoryWorkloadConfig():
            return default_workload_dir()
        return default_workload_dir().with_name(f"memory-coe-{config.num_small_experts}s{config.num_large_experts}l-"
                                                f"{config.input_size_px}px-seed{config.seed}")

    def stream(self, name: str) -> dict:
        """The driving settings of one workload."""
        if name == "components":
            return {"warmup": self.warmup_requests, "closed": self.closed_requests, "num_stations": self.num_stations,
                    "target_p99_ms": self.target_p99_ms, "min_requests": self.min_requests}
        return {"warmup": self.board_warmup, "closed": self.board_closed, "num_stations": self.board_stations,
                "target_p99_ms": self.board_target_p99_ms, "min_requests": self.board_min_requests}


@dataclass
class Workload:
    spec_path: Path
    spec: CoESpec
    zoo_root: Path
    experts: list[str]  # the experts requests reach (categories' and dependencies' downstream)
    expert_bytes: dict[str, int]
    usage: dict[str, float]
    streams: dict[str, list[WorkloadRequest]] = field(default_factory=dict)
    images: dict[str, dict[str, dict[int, np.ndarray]]] = field(default_factory=dict)  # stream -> id -> size -> rows


def served_experts(spec: CoESpec) -> list[str]:
    """The experts a request can reach: every category's and every dependency's downstream."""
    reached = {e for c in spec.categories for e in c.experts} | {d.downstream for d in spec.dependencies}
    return [e.name for e in spec.experts if e.name in reached]


def workload_zoo(spec: CoESpec, spec_path: Path) -> Path:
    return default_zoo_root(spec, spec_path) if spec.zoo_dir else spec_path.parent / "zoo"


def prepare_workload(s: MemorySettings) -> Workload:
    """Build the workload CoE (or reuse the one built before with these settings) and the seeded request streams."""
    spec_path = Path(build_workload_coe(s.workload_path(), s.workload_config(), progress=lambda line: say(f"  {line}")))
    spec = load_spec(spec_path)
    zoo = workload_zoo(spec, spec_path)
    experts = served_experts(spec)
    sizes = expert_bytes(spec, zoo)
    usage = usage_probabilities(spec)
    w = Workload(spec_path, spec, zoo, experts, {e: int(sizes[e]) for e in experts},
                 {e: float(usage.get(e, 0.0)) for e in experts})
    if "components" in s.workloads:
        w.streams["components"] = make_requests(spec, s.num_requests, seed=s.request_seed, zipf_s=s.zipf_s,
                                                num_stations=s.num_stations)
    if "boards" in s.workloads:
        w.streams["boards"] = make_boards(spec, s.board_requests, seed=s.request_seed + 1, zipf_s=s.zipf_s,
                                          num_stations=s.board_stations, components_per_board=s.components_per_board)
    for name, reqs in w.streams.items():
        say(f"workload {name}: {len(reqs)} requests of {len(reqs[0].parts)} component(s), generating images ...")
        w.images[name] = {str(r.request_id): request_images(spec, r) for r in reqs}
    return w


# ------------------------------------------------------------------ the memory model's plan of this node
def workload_costs(w: Workload, s: MemorySettings) -> dict[str, ExpertCost]:
    """Each served expert's cost from a current profile of the workload's CoE on this machine, profiling the missing
    ones first (`expertmesh profile --spec <its spec>` does the same)."""
    store_path = w.zoo_root / "profile.json"
    devices = serving_devices(w.spec, 0.0)
    store = ProfileStore.load(store_path) if store_path.exists() else None
    current = usable_profiles(store, w.spec, w.zoo_root, devices) if store else {}
    missing = [e for e in w.experts if e not in current]
    if missing:
        say(f"profiling {len(missing)} expert(s) of the workload's CoE on this machine (runs {s.profile_runs}) ...")
        profile_zoo(w.spec, w.zoo_root, store_path, devices=["cpu"], experts=missing,
                    cfg=MeasureConfig(runs=s.profile_runs), progress=False, log=lambda m: say(f"  {m}"))
        current = usable_profiles(ProfileStore.load(store_path), w.spec, w.zoo_root, devices)
    return {e: expert_cost(current[e]) for e in w.experts}


def node_plans(w: Workload, costs: dict[str, ExpertCost], b: Budgets, cores: int,
               components_per_request: int) -> dict[int, NodePlan]:
    """The memory model's plan of this node (the device bytes for weights plus one batch's activations per executor,
    the host bytes, `cores` compute slots) for requests of `components_per_request` components, by executor count:
    what it picks (key 0) and what it gives 2 executors."""
    planned_rps = 20.0
    usage = from_spec(w.spec)
    placed = [c.model_copy(update={"calls_per_s": planned_rps * usage.usage.get(e, 0.0)}) for e, c in costs.items()]
    edges = {(x.upstream, x.downstream): planned_rps * x.probability for x in usage.edges
             if x.kind == "dependency" and x.upstream in costs and x.downstream in costs}
    reserve = max(c.activation_bytes for c in placed)
    node = NodeMemory(device_bytes=b.device_bytes + reserve, host_bytes=b.host_bytes, compute_slots=cores)
    shape = {"components_per_request": components_per_request}
    chosen = plan_node(placed, edges, node, max_replicas=max(2, cores), **shape)
    out = {0: chosen}
    two = NodeMemory(device_bytes=b.device_bytes + 2 * reserve, host_bytes=b.host_bytes, compute_slots=cores)
    if predict(placed, edges, two, 2, **shape) is not None:  # 2 executors, each its half of the weight bytes
        out[2] = plan_node(placed, edges, NodeMemory(two.device_bytes, two.host_bytes, compute_slots=2),
                           max_replicas=2, headroom=1e9, **shape)
        out[2] = replace(out[2], max_wait_s=chosen.max_wait_s)  # the contest changes the executors only
    return out


def host_config(system: SystemUnderTest, b: Budgets, plans: dict[int, NodePlan]) -> HostConfig:
    """A pooled host system's replicas, budgets and tiers: the plan's for a planned system, the plain budgets
    (one replica) for the ablation, none for all-resident; every one with the plan's wait bound."""
    wait = plans[0].max_wait_s
    if not system.budgeted:
        return HostConfig(1, None, None, max_wait_s=wait)
    if system.planned:
        p = plans.get(system.num_replicas if system.num_replicas > 1 else 0)
        if p is None:
            raise ValueError(f"{system.name}: the memory model found no plan for {system.num_replicas} executors")
        return HostConfig(p.num_replicas, p.device_budget_bytes, p.host_budget_bytes,
                          {"device": list(p.resident), "host": list(p.host)}, p.reason, wait)
    return HostConfig(1, b.device_bytes, b.host_bytes, max_wait_s=wait)


def naive_mux(system: SystemUnderTest, w: Workload, b: Budgets, s: MemorySettings) -> MuxConfig:
    """The earlier baseline's one deployment: K by its rule, from_pretrained on every miss, no host cache."""
    if system.k_rule == "largest" and s.multiplexed_k:
        k, rule = s.multiplexed_k, "given"
    else:
        rule = system.k_rule or s.k_rule
        k = models_per_replica(b.device_bytes, w.expert_bytes, rule, w.usage)
    every = tuple(sorted(w.experts))
    dep = MuxDeployment(every, k, 0, max(w.spec.expert(e).max_batch for e in every), b.device_bytes)
    return MuxConfig(f"one deployment, K = {k} ({rule})", (dep,), loader="naive")


# ------------------------------------------------------------------ the whole run
def start_ray(s: MemorySettings) -> tuple[Path, tuple[int, ...]]:
    """One loopback Ray node in this process (Serve without proxies: the bench calls through handles); the systems'
    cores pinned apart from the driver's when the machine has more."""
    keep_ray_on_loopback()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    num_cpus = max(os.cpu_count() or 1, math.ceil(s.replica_num_cpus))
    split = split_cores(s.system_cores)
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(temp_dir),
             log_to_driver=False)
    serve.start(proxy_location="Disabled")
    if split is None:
        return temp_dir, ()
    systems, driver = split
    pin_threads(driver)
    return temp_dir, tuple(systems)


def _run_one(system: SystemUnderTest, deploy, w: Workload, stream: str, s: MemorySettings, answers: dict) -> dict:
    entry: dict = {"title": system.title, "kind": system.kind}
    try:
        deployed = deploy()
        entry["deploy_s"] = deployed.deploy_s
        say(f"  deployed in {deployed.deploy_s:.1f} s")
        st = s.stream(stream)
        sweep = {"start_fraction": s.open_start_fraction, "point_s": s.point_s, "min_requests": st["min_requests"],
                 "max_ramp_points": s.max_ramp_points, "max_fill_points": s.max_fill_points}
        try:
            entry.update(asyncio.run(measure(
                deployed, w.images[stream], w.streams[stream], warmup=st["warmup"], closed=st["closed"],
                num_stations=st["num_stations"], parts=s.parts, target_p99_ms=st["target_p99_ms"], sweep=sweep,
                deadline_s=s.deadline_s, answers=answers, say=say)))
        finally:
            deployed.delete()
    except Exception as exc:  # noqa: BLE001 - one system failing is a result; the others still run
        entry["error"] = f"{type(exc).__name__}: {exc}"
        say(f"  {system.name} FAILED: {entry['error']}")
    return entry


def search_multiplexing(w: Workload, stream: str, b: Budgets, d: Deployment, s: MemorySettings) -> list[dict]:
    """Every candidate configuration on a short closed loop of `stream`, best first."""
    max_batch = {e: w.spec.expert(e).max_batch for e in w.experts}
    found = []
    st = s.stream(stream)
    reqs = w.streams[stream][:st["warmup"] + s.search_requests]
    for i, mux in enumerate(candidates(w.expert_bytes, w.usage, max_batch, b.device_bytes, b.host_bytes)):
        say(f"  search {stream}: {mux.label} ...")
        try:
            deployed = deploy_multiplexed(SYSTEMS["multiplexed_best"], d, w.spec, mux, batch_wait_s=s.batch_wait_s,
                                          name=f"search-{i}")
            try:
                async def short() -> tuple[list, dict]:
                    warm = await closed_loop(deployed, w.images[stream], reqs[:st["warmup"]], s.deadline_s, {}, [],
                                             "search warm-up", say)
                    await deployed.reset_stats()
                    recs = await closed_loop(deployed, w.images[stream], reqs[st["warmup"]:], s.deadline_s, {}, [],
                                             "search", say)
                    return warm + recs, await deployed.stats()
                records, stats = asyncio.run(short())
            finally:
                deployed.delete()
            run = [r for r in records[st["warmup"]:] if r.code == "OK"]
            span = max(r.sent_s + r.latency_ms / 1000 for r in run) - min(r.sent_s for r in run) if run else 0
            found.append({"config": mux, "throughput_per_s": len(run) / span if span > 0 else 0.0,
                          "switches": stats.get("switches"), "errors": len(records) - len(run) - st["warmup"]})
            say(f"    {found[-1]['throughput_per_s']:.2f} req/s, {found[-1]['switches']} switches")
        except Exception as exc:  # noqa: BLE001 - a candidate that fails is reported, the search goes on
            found.append({"config": mux, "throughput_per_s": 0.0, "error": f"{type(exc).__name__}: {exc}"})
    return sorted(found, key=lambda f: -f["throughput_per_s"])


def run_memory(s: MemorySettings) -> dict:
    """The whole benchmark (see the module doc); returns the results document."""
    doc: dict = {"benchmark": "memory", **provenance(), "settings": s.model_dump(mode="json"), "runs": {}}
    w = prepare_workload(s)
    b = budgets(w.expert_bytes, s.device_budget_fraction, s.host_budget_fraction)
    costs = workload_costs(w, s)
    plans = {stream: node_plans(w, costs, b, s.system_cores, len(reqs[0].parts)) for stream, reqs in w.streams.items()}
    doc["workload"] = {"spec": str(w.spec_path), "num_experts": len(w.experts), "expert_bytes": w.expert_bytes,
                       "total_expert_bytes": b.total_expert_bytes, "largest_expert_bytes": max(w.expert_bytes.values()),
                       "device_budget_bytes": b.device_bytes, "host_budget_bytes": b.host_bytes, "usage": w.usage}
    say(f"{len(w.experts)} experts, {b.total_expert_bytes / 2**20:.1f} MiB; device {b.device_bytes / 2**20:.1f} MiB, "
        f"host {'none' if b.host_bytes is None else f'{b.host_bytes / 2**20:.1f} MiB'}")
    for stream, p in plans.items():
        say(f"  {stream}: the memory model plans {p[0].num_replicas} executor(s): {p[0].reason}")
    say("starting Ray (one loopback node) ...")
    t0 = time.perf_counter()
    own_cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    _, cores = start_ray(s)
    doc["ray_start_s"] = time.perf_counter() - t0
    doc["pinned"] = {"system_cores": list(cores), "driver_cores": sorted(os.sched_getaffinity(0))}
    d = Deployment(str(w.spec_path), str(w.zoo_root), replica_num_cpus=s.replica_num_cpus,
                   torch_threads=s.torch_threads, max_ongoing_requests=s.max_ongoing_requests, cpus=cores)
    assign = pool_costs_for(costs)
    try:
        for stream in w.streams:
            run: dict = {"systems": {}, "order": list(s.systems), "ablation": [n for n in ABLATION if n in s.systems],
                         "stream": s.stream(stream), "plan": {str(k): p.to_json() for k, p in plans[stream].items()}}
            doc["runs"][stream] = run
            answers: dict[str, dict] = {}
            if "multiplexed_best" in s.systems:
                found = search_multiplexing(w, stream, b, d, s)
                run["search"] = [{**f, "config": f["config"].to_json()} for f in found]
                best = found[0]["config"]
            for name in s.systems:
                system = SYSTEMS[name]
                answers[name] = {}
                say(f"[{stream}] {system.title}: deploying ...")
                if system.kind == "host":
                    cfg = host_config(system, b, plans[stream])
                    run["systems"][name] = _run_one(system, lambda: deploy_host(
                        system, d, w.spec, w.experts, cfg, w.usage, costs=assign), w, stream, s, answers[name])
                    run["systems"][name]["config"] = cfg.__dict__
                else:
                    mux = best if system.search else naive_mux(system, w, b, s)
                    run["systems"][name] = _run_one(system, lambda: deploy_multiplexed(
                        system, d, w.spec, mux, batch_wait_s=s.batch_wait_s), w, stream, s, answers[name])
                    run["systems"][name]["config"] = mux.to_json()
            for name, sys in run["systems"].items():
                sys["labels"] = label_check(answers[REFERENCE], answers[name]) if REFERENCE in answers else None
            run["headline"] = headline({**doc, **run})
    finally:
        serve.shutdown()
        ray.shutdown()
        if own_cores:  # the driver was pinned apart from the systems: give this process its cores back
            pin_threads(own_cores)
    doc["machine"]["load_average_1_5_15m_at_end"] = list(os.getloadavg())
    return doc


def pool_costs_for(costs: dict[str, ExpertCost]) -> dict[str, list[float]]:
    """The assign router's costs (K, B, switch ms per expert) from the workload's profile."""
    return {e: [round(c.k_ms_per_item, 4), round(c.b_ms_per_batch, 4), round(c.switch_ms, 4)]
            for e, c in sorted(costs.items())}
