"""`expertmesh bench memory`, the run: every system under test (bench/memory_systems.py) on one local Ray node, one
after the other, driven by the same seeded requests from this process through Serve handles.

The workload (bench/memory_workload.py) is a larger PCB CoE (small and ResNet-18-class experts), built once into a
directory that later runs reuse, and a seeded list of requests: each a station, a category and the category's
expert calls (a chain may add dependent calls), with its own generated image. Per system:
1. deploy it (Serve application `mem-<system>`), warm it up with the first requests (closed loop), reset its stats;
2. closed loop: `num_stations` stations each send their next request when the previous one is answered (the same
   requests for every system); throughput, p50/p99 latency and the stats of the phase (switches, loads by tier,
   evictions, prefetch hits, peak bytes);
3. open loop: fixed rates from half the closed-loop throughput, doubling, then filling in (the throughput bench's
   adaptive sweep), for the highest rate whose p99 holds `target_p99_ms`; the stats of the sweep;
4. delete it.
Every answer is kept per request id and checked against the all-resident run's labels at the end.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from expertmesh.bench.memory_systems import (ABLATION, K_RULES, REFERENCE, SYSTEMS, Budgets, DeployedSystem,
                                             Deployment, NO_HOST_COPIES_BYTES, SystemUnderTest, budgets,
                                             deploy, models_per_replica)
from expertmesh.bench.memory_table import closed_summary, headline, label_check
from expertmesh.bench.memory_workload import (MemoryWorkloadConfig, WorkloadRequest, build_workload_coe,
                                              default_workload_dir, expert_bytes, make_requests, request_images)
from expertmesh.bench.provenance import provenance
from expertmesh.bench.throughput_run import say
from expertmesh.bench.throughput_sweep import (DEADLINE, OK, RequestRecord, SweepRule, next_rate, num_requests_for,
                                               send_offsets_s, summarize_point)
from expertmesh.bench.throughput_table import sweep_summary
from expertmesh.cluster.connect import keep_ray_on_loopback
from expertmesh.deployments.config import pool_costs
from expertmesh.errors import InvalidArgument
from expertmesh.experts.graph import usage_probabilities
from expertmesh.experts.spec import CoESpec, default_zoo_root, load_spec
from expertmesh.profiler.serving_profiles import serving_devices, usable_profiles
from expertmesh.profiler.store import ProfileStore

PROGRESS_EVERY_S = 5.0


class MemorySettings(BaseModel):
    """Every knob of a run (recorded in its JSON). `quick()` is the short version the test suite runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # the workload
    num_small_experts: int = Field(40, ge=1)
    num_large_experts: int = Field(8, ge=0, description="ResNet-18-class experts")
    input_size_px: int = Field(64, ge=16)
    workload_seed: int = 0
    workload_dir: str | None = Field(None, description="where the workload CoE is built (and reused); default "
                                                       "$EXPERTMESH_HOME/bench/memory-coe[-<sizes>]")
    request_seed: int = 1
    zipf_s: float = Field(1.1, gt=0, description="skew of the category mix (Zipf exponent)")
    num_stations: int = Field(8, ge=1, description="stations: the closed loop's concurrency")
    # budgets, per replica
    device_budget_fraction: float = Field(1 / 3, gt=0, le=1, description="device budget, of all the experts' bytes")
    host_budget_fraction: float | None = Field(2 / 3, gt=0, description="host-memory budget of the pooled hosts, of "
                                                                        "all the experts' bytes (None: no limit)")
    k_rule: Literal["largest", "usage", "mean"] = Field(
        "largest", description="(b)'s K (memory_systems.models_per_replica): the device budget over the largest "
                               "expert's bytes (never over the budget), the most used experts that fit it together, "
                               "or the budget over the mean expert's bytes")
    multiplexed_k: int | None = Field(None, ge=1, description="K of (b) given outright (overrides k_rule)")
    # deployment (the same for every system)
    replica_num_cpus: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(256, ge=1, description="per replica, every system")
    max_wait_s: float = Field(0.5, ge=0, description="the pooled host's bound on how long arrange delays a call (the serve default, pool_max_wait_s)")
    batch_wait_s: float = Field(0.01, ge=0, description="Serve's batch_wait_timeout_s for the multiplexed baseline")
    # load
    warmup_requests: int = Field(100, ge=0)
    closed_requests: int = Field(600, ge=1, description="requests of the closed-loop run (the same for every system)")
    num_requests: int = Field(3000, ge=1, description="the seeded request list; open-loop points cycle through it")
    target_p99_ms: float = Field(1000.0, gt=0, description="the open-loop p99 bound")
    open_start_fraction: float = Field(0.5, gt=0, description="the sweep starts at this share of the closed-loop "
                                                              "throughput")
    point_s: float = Field(10.0, gt=0, description="seconds of sending per open-loop point (at least min_requests)")
    min_requests: int = Field(100, ge=1, description="requests per open-loop point, at least (for a p99)")
    max_ramp_points: int = Field(5, ge=1)
    max_fill_points: int = Field(2, ge=0)
    deadline_s: float = Field(60.0, gt=0, description="per request")
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
        # three of the quick CoE's experts are 97% of its bytes: a budget of 3/4 leaves each of two replicas room for one
        return cls(**{"num_small_experts": 6, "num_large_experts": 3, "num_stations": 4, "warmup_requests": 10,
                      "device_budget_fraction": 0.75,
                      "closed_requests": 40, "num_requests": 200, "point_s": 1.0, "min_requests": 20,
                      "max_ramp_points": 1, "max_fill_points": 0, "deadline_s": 30.0, **overrides})

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


@dataclass
class Workload:
    spec_path: Path
    spec: CoESpec
    zoo_root: Path
    experts: list[str]  # the experts requests reach (categories' and dependencies' downstream)
    expert_bytes: dict[str, int]
    usage: dict[str, float]
    requests: list[WorkloadRequest]
    images: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # request id -> size -> [1, S, S, 3]

    def cycle(self, start: int, n: int) -> list[WorkloadRequest]:
        """`n` requests from position `start` of the list, wrapping around."""
        return [self.requests[(start + i) % len(self.requests)] for i in range(n)]


def served_experts(spec: CoESpec) -> list[str]:
    """The experts a request can reach: every category's and every dependency's downstream."""
    reached = {e for c in spec.categories for e in c.experts} | {d.downstream for d in spec.dependencies}
    return [e.name for e in spec.experts if e.name in reached]


def prepare_workload(s: MemorySettings) -> Workload:
    """Build the workload CoE (or reuse the one built before with these settings) and the seeded requests."""
    spec_path = Path(build_workload_coe(s.workload_path(), s.workload_config(), progress=lambda line: say(f"  {line}")))
    spec = load_spec(spec_path)
    zoo = workload_zoo(spec, spec_path)
    experts = served_experts(spec)
    sizes = expert_bytes(spec, zoo)
    usage = usage_probabilities(spec)
    requests = make_requests(spec, s.num_requests, seed=s.request_seed, zipf_s=s.zipf_s, num_stations=s.num_stations)
    say(f"workload: {len(requests)} requests, generating their images ...")
    images = {str(r.request_id): request_images(spec, r) for r in requests}
    return Workload(spec_path, spec, zoo, experts, {e: int(sizes[e]) for e in experts},
                    {e: float(usage.get(e, 0.0)) for e in experts}, list(requests), images)


def workload_zoo(spec: CoESpec, spec_path: Path) -> Path:
    return default_zoo_root(spec, spec_path) if spec.zoo_dir else spec_path.parent / "zoo"


# ------------------------------------------------------------------ driving one system
Answers = dict[str, dict[str, str]]  # request id -> expert -> label


async def _one(system: DeployedSystem, w: Workload, req: WorkloadRequest, start: float, deadline_s: float,
               records: list[RequestRecord], answers: Answers, inconsistent: list[str]) -> None:
    t0 = time.perf_counter()
    code = OK
    try:
        labels = await asyncio.wait_for(system.send(req.calls, w.images[str(req.request_id)]), deadline_s)
        rid = str(req.request_id)
        if rid in answers and answers[rid] != labels:
            inconsistent.append(rid)
        answers.setdefault(rid, labels)
    except asyncio.TimeoutError:
        code = DEADLINE
    except Exception as exc:  # noqa: BLE001 - a failed request is a result (its error's name), not the end of the run
        code = type(exc).__name__
    records.append(RequestRecord(sent_s=t0 - start, latency_ms=(time.perf_counter() - t0) * 1000.0, code=code,
                                 num_components=1 if code == OK else 0))


async def _report(label: str, start: float, total: int, records: list[RequestRecord]) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        errors = sum(r.code != OK for r in records)
        say(f"    {label}: {time.perf_counter() - start:5.1f} s, {len(records)}/{total} answered, {errors} errors")


async def closed_loop(system: DeployedSystem, w: Workload, requests: Sequence[WorkloadRequest], deadline_s: float,
                      answers: Answers, inconsistent: list[str], label: str) -> list[RequestRecord]:
    """Each station sends its requests one after the other, the next when the previous one was answered."""
    by_station: dict[str, list[WorkloadRequest]] = {}
    for req in requests:
        by_station.setdefault(str(req.station), []).append(req)
    records: list[RequestRecord] = []
    start = time.perf_counter()

    async def station(reqs: list[WorkloadRequest]) -> None:
        for req in reqs:
            await _one(system, w, req, start, deadline_s, records, answers, inconsistent)

    reporter = asyncio.create_task(_report(label, start, len(requests), records))
    try:
        await asyncio.gather(*(station(reqs) for reqs in by_station.values()))
    finally:
        reporter.cancel()
    return records


async def open_point(system: DeployedSystem, w: Workload, requests: Sequence[WorkloadRequest], rate_per_s: float,
                     deadline_s: float, answers: Answers, inconsistent: list[str], label: str) -> list[RequestRecord]:
    """Request i is sent i / rate seconds after the start, whatever the system does."""
    records: list[RequestRecord] = []
    start = time.perf_counter()
    reporter = asyncio.create_task(_report(label, start, len(requests), records))
    tasks = []
    try:
        for req, offset in zip(requests, send_offsets_s(len(requests), rate_per_s)):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(system, w, req, start, deadline_s, records, answers, inconsistent)))
        await asyncio.gather(*tasks)
    finally:
        reporter.cancel()
    return records


def open_start_rate(closed_throughput_per_s: float | None, s: MemorySettings) -> float:
    """Where the sweep starts: a share of the closed-loop throughput (1/s when there is none), to 2 significant
    digits."""
    rate = (closed_throughput_per_s or 2.0) * s.open_start_fraction
    return float(f"{max(rate, 0.1):.2g}")


async def measure(system: DeployedSystem, w: Workload, s: MemorySettings, answers: Answers) -> dict:
    name = system.system.name
    out: dict = {}
    inconsistent: list[str] = []
    warm = w.requests[:s.warmup_requests]
    closed = w.requests[s.warmup_requests:s.warmup_requests + s.closed_requests]
    if warm:
        say(f"  {name}: warm-up, {len(warm)} requests closed-loop ...")
        await closed_loop(system, w, warm, s.deadline_s, answers, inconsistent, f"{name} warm-up")
    if "closed" in s.parts:
        await system.reset_stats()
        say(f"  {name}: closed loop, {len(closed)} requests from {s.num_stations} stations ...")
        records = await closed_loop(system, w, closed, s.deadline_s, answers, inconsistent, f"{name} closed")
        out["closed"] = {**closed_summary(records, s.num_stations), "stats": await system.stats()}
        c = out["closed"]
        say(f"  {name}: closed loop {_f(c['throughput_per_s'], '.1f')} req/s, p50 {_f(c['p50_ms'], '.0f')} ms, "
            f"p99 {_f(c['p99_ms'], '.0f')} ms, switches {c['stats'].get('switches')}, errors "
            f"{c['errors_by_code'] or 'none'}")
    if "open" in s.parts:
        await system.reset_stats()
        rule = SweepRule(start_per_s=open_start_rate((out.get("closed") or {}).get("throughput_per_s"), s),
                         target_p99_ms=s.target_p99_ms, max_ramp_points=s.max_ramp_points,
                         max_fill_points=s.max_fill_points)
        cursor = s.warmup_requests + s.closed_requests  # the same requests at the same rates for every system
        points = []
        while (rate := next_rate(points, rule)) is not None:
            n = num_requests_for(rate, s.point_s, s.min_requests)
            say(f"  {name} open loop at {rate:.3g}/s: {n} requests ...")
            records = await open_point(system, w, w.cycle(cursor, n), rate, s.deadline_s, answers, inconsistent,
                                       f"{name} {rate:.3g}/s")
            cursor += n
            p = summarize_point(records, rate)
            say(f"  {name} at {rate:.3g}/s: achieved {p.achieved_per_s:.3g}/s, p50 {_f(p.p50_ms, '.0f')} ms, "
                f"p99 {_f(p.p99_ms, '.0f')} ms, errors {p.errors_by_code or 'none'}")
            points.append(p)
        out["open"] = {**sweep_summary(points, rule, 1), "stats": await system.stats()}
        say(f"  {name}: highest rate with p99 <= {s.target_p99_ms:g} ms: "
            f"{_f(out['open']['highest_rate_meeting_target_per_s'], '.3g')}/s, capacity "
            f"{_f(out['open']['capacity_per_s'], '.3g')}/s")
    out["num_inconsistent_answers"] = len(inconsistent)
    return out


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


# ------------------------------------------------------------------ the whole run
def start_ray(s: MemorySettings) -> Path:
    """One loopback Ray node in this process (Serve without proxies: the bench calls through handles)."""
    keep_ray_on_loopback()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    num_cpus = max(os.cpu_count() or 1, math.ceil(s.replica_num_cpus))
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(temp_dir),
             log_to_driver=False)
    serve.start(proxy_location="Disabled")
    return temp_dir


def multiplexed_k(system: SystemUnderTest, w: Workload, b: Budgets, s: MemorySettings) -> tuple[int, str]:
    """K of a multiplexed system and the rule that gave it (the setting's K is (b)'s, given outright)."""
    if system.k_rule is None and s.multiplexed_k:
        return s.multiplexed_k, "given"
    rule = system.k_rule or s.k_rule
    return models_per_replica(b.device_bytes, w.expert_bytes, rule, w.usage), rule


def workload_doc(w: Workload, b: Budgets, s: MemorySettings) -> dict:
    large = sorted(w.expert_bytes.values())
    return {"spec": str(w.spec_path), "zoo": str(w.zoo_root), "num_experts": len(w.experts),
            "expert_bytes": w.expert_bytes, "total_expert_bytes": b.total_expert_bytes,
            "mean_expert_bytes": b.total_expert_bytes / len(w.experts), "largest_expert_bytes": large[-1],
            "smallest_expert_bytes": large[0], "device_budget_bytes": b.device_bytes,
            "host_budget_bytes": b.host_bytes,
            "multiplexed_k": multiplexed_k(SYSTEMS["multiplexed"], w, b, s)[0],
            "k_rule": multiplexed_k(SYSTEMS["multiplexed"], w, b, s)[1],
            "k_by_rule": {rule: models_per_replica(b.device_bytes, w.expert_bytes, rule, w.usage) for rule in K_RULES},
            "usage": w.usage, "num_requests": len(w.requests),
            "categories": {c: sum(r.category == c for r in w.requests) for c in sorted({r.category for r in w.requests})}}


def run_memory(s: MemorySettings) -> dict:
    """The whole benchmark (see the module doc); returns the results document."""
    doc: dict = {"benchmark": "memory", **provenance(), "settings": s.model_dump(mode="json"),
                 "order": list(s.systems), "ablation": [n for n in ABLATION if n in s.systems], "systems": {}}
    w = prepare_workload(s)
    b = budgets(w.expert_bytes, s.device_budget_fraction, s.host_budget_fraction)
    for name in s.systems:  # a system of n replicas divides the budgets: each share must still hold the largest expert
        n, largest = SYSTEMS[name].num_replicas, max(w.expert_bytes.values())
        if b.per_replica(n).device_bytes < largest:
            raise InvalidArgument(f"{name} divides the device budget of {b.device_bytes} bytes among {n} replicas, "
                                  f"below the largest expert ({largest} bytes)", field="device_budget_fraction",
                                  fix=f"raise device_budget_fraction, or leave {name} out (--systems)")
    doc["workload"] = workload_doc(w, b, s)
    k = doc["workload"]["multiplexed_k"]
    say(f"{len(w.experts)} experts, {b.total_expert_bytes / 2**20:.1f} MiB; device budget "
        f"{b.device_bytes / 2**20:.1f} MiB, host budget "
        f"{'none' if b.host_bytes is None else f'{b.host_bytes / 2**20:.1f} MiB'}; multiplexing K = {k}")
    d = Deployment(str(w.spec_path), str(w.zoo_root), num_replicas=1, replica_num_cpus=s.replica_num_cpus,
                   torch_threads=s.torch_threads, max_ongoing_requests=s.max_ongoing_requests)
    answers: dict[str, Answers] = {}
    costs = assign_costs(w)
    doc["workload"]["assign_costs_from"] = "profile" if costs else "defaults (no current profile of the CoE)"
    say("starting Ray (one loopback node) ...")
    t0 = time.perf_counter()
    start_ray(s)
    doc["ray_start_s"] = time.perf_counter() - t0
    try:
        for name in s.systems:
            system = SYSTEMS[name]
            k, k_rule = multiplexed_k(system, w, b, s)
            entry = {"title": system.title, "kind": system.kind, "config": _config_doc(system, b, k, k_rule, s)}
            doc["systems"][name] = entry
            answers[name] = {}
            say(f"{system.title}: deploying" + (f" (K = {k}, rule {k_rule})" if system.kind == "multiplexed" else "")
                + " ...")
            try:
                deployed = deploy(system, d, w.spec, w.experts, b, w.usage, max_wait_s=s.max_wait_s,
                                  batch_wait_s=s.batch_wait_s, k=k, costs=costs)
                entry["deploy_s"] = deployed.deploy_s
                say(f"  deployed in {deployed.deploy_s:.1f} s")
                try:
                    entry.update(asyncio.run(measure(deployed, w, s, answers[name])))
                finally:
                    deployed.delete()
            except Exception as exc:  # noqa: BLE001 - one system failing is a result; the others still run
                entry["error"] = f"{type(exc).__name__}: {exc}"
                say(f"  {name} FAILED: {entry['error']}")
    finally:
        serve.shutdown()
        ray.shutdown()
    for name, sys in doc["systems"].items():
        sys["labels"] = label_check(answers[REFERENCE], answers[name]) if REFERENCE in answers else None
    doc["headline"] = headline(doc)
    doc["machine"]["load_average_1_5_15m_at_end"] = list(os.getloadavg())
    return doc


def assign_costs(w: Workload) -> dict[str, list[float]]:
    """The assign router's costs (K, B, switch ms per expert) from a current profile of the workload's CoE (`expertmesh
    profile --spec <its spec>` writes <its zoo>/profile.json); empty without one (the router's defaults)."""
    path = w.zoo_root / "profile.json"
    if not path.exists():
        return {}
    profiles = usable_profiles(ProfileStore.load(path), w.spec, w.zoo_root, serving_devices(w.spec, 0.0),
                               warn=lambda m: say(f"  profile: {m}"))
    return pool_costs(profiles)


def _config_doc(system: SystemUnderTest, b: Budgets, k: int, k_rule: str, s: MemorySettings) -> Mapping:
    n = system.num_replicas
    common = {"num_replicas": n, "replica_num_cpus": s.replica_num_cpus / n, "torch_threads": s.torch_threads,
              "max_ongoing_requests": s.max_ongoing_requests}
    share = b.per_replica(n)
    if system.kind == "multiplexed":
        return {**common, "max_num_models_per_replica": k, "k_rule": k_rule, "batch_wait_timeout_s": s.batch_wait_s,
                "device_budget_bytes": b.device_bytes, "host_tier": False}
    return {**common, "arrange": system.arrange, "evict": system.evict, "prefetch": system.prefetch,
            "max_wait_s": s.max_wait_s, "request_router": system.request_router,
            "device_budget_bytes": share.device_bytes if system.budgeted else None,  # per replica
            "host_budget_bytes": (share.host_bytes if system.host_tier else NO_HOST_COPIES_BYTES) if system.budgeted
            else None}
