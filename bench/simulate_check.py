"""The simulator against the memory benchmark: fed this machine's profile and the benchmark's own workloads, does it
predict the measured closed-loop throughput and switches of every system, the Serve multiplexing baselines included?
(`expertmesh bench simulate --check`)

Inputs, all from the machine and the run being predicted:
- the experts' costs from the profile of the benchmark's CoE on this machine (the one the benchmark planned with):
  K and B, the best batch, bytes, the measured host -> device and disk -> device load times
  (`simulate_profile.experts_from_profile`); for the earlier multiplexing baseline also what its load function adds
  (`from_pretrained` building the model, timed here per size class) and its eviction's garbage collection (the
  profile's device -> disk move);
- each workload's requests the closed loop sent (the same seeds, order and stations), each component as the calls it
  really makes, wave by wave: the CoE is run offline on each component's image, so the triggered dependent calls are
  the ones serving made (every system gives the same answers);
- each system's configuration as the run recorded it: the memory model's executors, budgets, tiers and wait bound,
  the ablation's policies, assign or Serve's power of two for two executors, the multiplexing configuration (its
  deployments, K, batch size, host cache, loader), the pinned core (one compute slot; a CPU load takes it).

One number is fitted, on one row. The profile times the model alone; a replica also spends time on every request
it receives outside the model (Serve's request handling, deserialising the images, the event loop) on the same core:
a pooled host receives one request per board or component, a multiplexed deployment one per expert of each wave.
That per-request overhead is set so that the simulated every-expert-resident run of the components workload has the
measured throughput; every other row of both workloads - all-resident on boards, ExpertMesh, the ablation, the two
executors, and each Serve multiplexing configuration - is a prediction. The earlier multiplexing baseline's load and
eviction times are its own, measured by the deployment during the run (its stats: `load_ms_mean`, `unload_ms_mean`).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from expertmesh.bench.memory_run import MemorySettings, served_experts, workload_zoo
from expertmesh.bench.memory_search import candidates
from expertmesh.bench.memory_workload import build_workload_coe
from expertmesh.bench.memory_workload_requests import WorkloadRequest, make_boards, make_requests, request_images
from expertmesh.bench.provenance import provenance
from expertmesh.cluster.simulate import (AssignPolicy, PolicySpec, ServeDeployment, SimConfig, SimExpert, SimRequest,
                                         SimResult, simulate)
from expertmesh.cluster.simulate_profile import experts_from_profile
from expertmesh.errors import FailedPrecondition, InvalidArgument
from expertmesh.experts.arrange import ArrangePolicy
from expertmesh.experts.eviction import EvictionPolicy
from expertmesh.experts.offline import load_runtime, predict
from expertmesh.experts.spec import CoESpec, load_spec
from expertmesh.profiler.store import ProfileStore
from expertmesh.profiler.usage import from_spec
from expertmesh.router.plan import Call, ExpertOutput, Reason
from expertmesh.router.waves import PlanInFlight, record, take_calls

TOLERANCE = 0.15  # the bar: within 15% of every measured row
HOST_SYSTEMS = {"all_resident", "expertmesh", "fcfs_lru", "evict_only", "evict_arrange", "expertmesh_2x_pow2",
                "expertmesh_2x_assign"}


# ------------------------------------------------------------------ the requests, as serving made them
def component_waves(spec: CoESpec, zoo: Path, requests: Sequence[WorkloadRequest],
                    progress: Callable[[str], object] = print) -> list[list[list[list[str]]]]:
    """Per request, per component, the experts of each wave it made (its first calls, then the calls their outputs
    triggered), from the CoE run offline on each component's image."""
    keys = [(i, k) for i, r in enumerate(requests) for k in range(len(r.parts))]
    images = {}
    for i, r in enumerate(requests):
        rows = request_images(spec, r)
        for k in range(len(r.parts)):
            images[(i, k)] = {size: rows[size][k:k + 1] for size in rows}
    plans = {j: PlanInFlight.start(Call(e, Reason.TABLE) for e in requests[i].parts[k].calls)
             for j, (i, k) in enumerate(keys)}
    waves: dict[int, list[list[str]]] = {j: [] for j in plans}
    runtimes = {}
    while wave := take_calls(plans):
        now: dict[int, list[str]] = {}
        for name, items in wave.items():
            if name not in runtimes:
                runtimes[name] = load_runtime(spec, spec.expert(name), zoo)
            size = spec.expert(name).input_size_px
            batch = np.concatenate([images[keys[j]][size] for j, _ in items])
            for (j, call), pred in zip(items, predict(runtimes[name], batch)):
                record(spec, plans[j], call, ExpertOutput(name, pred.label, pred.score))
                now.setdefault(j, []).append(name)
        for j, experts in now.items():
            waves[j].append(experts)
        progress(f"  chains: a wave of {sum(len(v) for v in wave.values())} calls over {len(wave)} experts")
    out: list[list[list[list[str]]]] = [[] for _ in requests]
    for j, (i, _) in enumerate(keys):
        out[i].append(waves[j])
    return out


def sim_request(parts: list[list[list[str]]]) -> SimRequest:
    """A request whose components made these waves: each component's first expert of every wave is its chain, the
    others of a wave its branches."""
    chains = tuple(tuple(w[0] for w in waves) for waves in parts)
    branches = tuple((k, step, e) for k, waves in enumerate(parts) for step, w in enumerate(waves) for e in w[1:])
    return SimRequest.board(0.0, chains, branches=branches)


# ------------------------------------------------------------------ each measured system as the simulator runs it
def naive_costs(stats: Mapping, experts: Mapping[str, SimExpert]) -> tuple[float, float]:
    """(what the earlier multiplexing's load adds over the fast path's disk load, ms; its eviction, ms), from what the
    deployment measured during the run: `from_pretrained` building the model, and `unload()`'s full collection."""
    disk = statistics.mean(x.load_from_disk_ms or 0.0 for x in experts.values())
    return max(0.0, float(stats.get("load_ms_mean") or 0.0) - disk), float(stats.get("unload_ms_mean") or 0.0)


def mux_policy(config: Mapping, w: Mapping, spec: CoESpec, s: MemorySettings, served: Sequence[str],
               naive: tuple[float, float]) -> PolicySpec:
    """The multiplexing configuration a run recorded, as the simulator's Serve deployments (the search's candidates are
    deterministic from the budgets, so the label names them)."""
    sizes = {e: int(b) for e, b in w["expert_bytes"].items()}
    max_batch = {e: spec.expert(e).max_batch for e in served}
    if config.get("loader") == "naive":
        k = config["deployments"][0]["max_models"]
        extra, unload = naive
        deps = (ServeDeployment(experts=tuple(sorted(served)), max_models=k, max_batch_size=max(max_batch.values()),
                                batch_wait_ms=1000.0 * s.batch_wait_s, host_cache_bytes=0, load_extra_ms=extra,
                                unload_ms=unload),)
    else:
        found = {c.label: c for c in candidates(sizes, w["usage"], max_batch, w["device_budget_bytes"],
                                                  w["host_budget_bytes"])}
        mux = found[config["label"]]
        deps = tuple(ServeDeployment(experts=d.experts, max_models=d.max_models, max_batch_size=d.batch_max_images,
                                     batch_wait_ms=1000.0 * s.batch_wait_s, host_cache_bytes=d.host_cache_bytes)
                     for d in mux.deployments)
    return PolicySpec(label=config.get("label", "multiplexed"), assign=AssignPolicy.SINGLE,
                      arrange=ArrangePolicy.FCFS, evict=EvictionPolicy.LRU, serve_multiplexed=deps)


def host_policy(name: str, run: Mapping) -> tuple[PolicySpec, int]:
    """(the pooled host system's policy, its executors)."""
    arrange = ArrangePolicy.FCFS if name in ("fcfs_lru", "evict_only") else ArrangePolicy.COSERVE
    evict = EvictionPolicy.LRU if name == "fcfs_lru" else EvictionPolicy.COSERVE
    prefetch = name in ("all_resident", "expertmesh", "expertmesh_2x_pow2", "expertmesh_2x_assign")
    n = int((run["systems"][name].get("config") or {}).get("num_replicas") or 1)
    assign = AssignPolicy.SINGLE if n == 1 else (AssignPolicy.PREDICTED if name.endswith("assign") else AssignPolicy.POW2)
    return PolicySpec(label=name, assign=assign, arrange=arrange, evict=evict, prefetch=prefetch), n


def sim_config(name: str, run: Mapping, w: Mapping, s: MemorySettings, doc: Mapping, request_overhead_ms: float
               ) -> SimConfig:
    cfg = run["systems"][name].get("config") or {}
    st = run["stream"]
    n = int(cfg.get("num_replicas") or 1)
    device, host = cfg.get("device_budget_bytes"), cfg.get("host_budget_bytes")
    lifted = name == "all_resident" or device is None  # a multiplexing run's memory is its deployments' (K models)
    return SimConfig(device_budget_bytes=10 * int(w["total_expert_bytes"]) if lifted else int(device) * n,
                     host_budget_bytes=None if lifted or host is None else int(host) * n,
                     num_parallel_executors=n, activation_reserve_bytes=0,
                     compute_slots=max(1, len((doc.get("pinned") or {}).get("system_cores") or [0])),
                     loads_use_compute=True, host_to_device_bytes_per_s=1e9, disk_bytes_per_s=1e9,
                     max_wait_ms=1000.0 * float(cfg.get("max_wait_s") or 0.5), closed_loop_stations=st["num_stations"],
                     warmup_requests=st["warmup"], request_overhead_ms=request_overhead_ms, turnaround_ms=0.0)


def fit_overhead(rate: Callable[[float], float], measured_per_s: float) -> float:
    """The overhead (ms) at which `rate` (simulated requests/s) equals the measured one (bisection; 0 when even with
    none the simulation is slower)."""
    lo, hi = 0.0, 8.0
    if rate(lo) <= measured_per_s:
        return 0.0
    while rate(hi) > measured_per_s and hi < 1e4:
        hi *= 2
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) > measured_per_s else (lo, mid)
    return (lo + hi) / 2


def _row(title: str, policy: str, real: Mapping, sim: SimResult) -> dict:
    real_switches = (real.get("stats") or {}).get("switches")
    return {"title": title, "policy": policy,
            "measured": {"throughput_per_s": real["throughput_per_s"], "switches": real_switches,
                         "p50_ms": real.get("p50_ms"), "p99_ms": real.get("p99_ms")},
            "simulated": {"throughput_per_s": sim.throughput_per_s, "switches": sim.switches,
                          "loads_from_host": sim.loads_from_host, "loads_from_disk": sim.loads_from_disk,
                          "p50_ms": sim.p50_ms, "p99_ms": sim.p99_ms},
            "throughput_error": sim.throughput_per_s / real["throughput_per_s"] - 1.0,
            "switch_error": (sim.switches / real_switches - 1.0) if real_switches else None,
            "p50_error": (sim.p50_ms / real["p50_ms"] - 1.0) if real.get("p50_ms") else None}


def check(memory_doc: dict, profile_path: Path | None = None, device: str = "cpu",
          progress: Callable[[str], object] = print) -> dict:
    """Predict every system of a memory benchmark results document, per workload; measured beside predicted."""
    s = MemorySettings.model_validate({k: v for k, v in memory_doc["settings"].items()
                                       if k in MemorySettings.model_fields})
    spec_path = Path(build_workload_coe(s.workload_path(), s.workload_config(), progress=progress))
    spec = load_spec(spec_path)
    zoo = workload_zoo(spec, spec_path)
    profile_path = profile_path or zoo / "profile.json"
    if not profile_path.exists():
        raise FailedPrecondition(f"no profile of the benchmark's CoE at {profile_path}", field="--profile",
                                 fix=f"expertmesh profile --spec {spec_path} --out {profile_path} --usage spec")
    store = ProfileStore.load(profile_path)
    store.usage = store.usage or from_spec(spec)
    experts = experts_from_profile(store, device)
    served = served_experts(spec)
    missing = sorted(set(served) - set(experts))
    if missing:
        raise FailedPrecondition(f"the profile has no {device} entries for {', '.join(missing[:5])}", field="profile",
                                 fix=f"profile the benchmark's CoE: expertmesh profile --spec {spec_path} --usage spec")
    experts = {e: x for e, x in experts.items() if e in served}
    edges = {(x.upstream, x.downstream): x.probability for x in store.usage.edges}
    usage = store.usage.usage
    experts = {e: replace(x, triggers=tuple((d, p / max(usage.get(e, 0.0), 1e-12)) for (u, d), p in sorted(edges.items())
                                            if u == e and d in experts)) for e, x in experts.items()}
    w = memory_doc["workload"]
    runs = {}
    overhead_ms: float | None = None
    order = sorted(memory_doc["runs"], key=lambda n: n != "components")  # the fit on the components workload
    for stream in order:
        run = memory_doc["runs"][stream]
        st = run["stream"]
        n = st["warmup"] + st["closed"]
        reqs = (make_requests(spec, n, seed=s.request_seed, zipf_s=s.zipf_s, num_stations=s.num_stations)
                if stream == "components" else
                make_boards(spec, n, seed=s.request_seed + 1, zipf_s=s.zipf_s, num_stations=s.board_stations,
                            components_per_board=s.components_per_board))
        t0 = time.perf_counter()
        requests = [sim_request(parts) for parts in component_waves(spec, zoo, reqs, lambda _: None)]
        progress(f"{stream}: chains of {len(requests)} requests in {time.perf_counter() - t0:.1f} s")
        measured = run["systems"]
        if overhead_ms is None:
            ref = measured["all_resident"]["closed"]["throughput_per_s"]
            ref_policy, _ = host_policy("all_resident", run)
            overhead_ms = fit_overhead(lambda o: simulate(experts, requests, sim_config(
                "all_resident", run, w, s, memory_doc, o), ref_policy).throughput_per_s, ref)
            fitted_on = stream
            progress(f"  per-request overhead fitted on the {stream} all-resident row: {overhead_ms:.2f} ms")
        rows = {}
        for name, sys_ in measured.items():
            if "closed" not in sys_:
                continue
            if name in HOST_SYSTEMS:
                policy, _ = host_policy(name, run)
                label = f"{policy.arrange.value} + {policy.evict.value}" + (" + prefetch" if policy.prefetch else "") + (
                    f", {policy.assign.value} over 2" if policy.assign is not AssignPolicy.SINGLE else "")
            else:
                policy = mux_policy(sys_["config"], w, spec, s, served,
                                    naive_costs(sys_["closed"].get("stats") or {}, experts))
                label = f"Serve multiplexing: {policy.label}" + (" (naive loader)" if sys_["config"].get(
                    "loader") == "naive" else "")
            sim = simulate(experts, requests, sim_config(name, run, w, s, memory_doc, overhead_ms), policy)
            rows[name] = _row(sys_["title"], label, sys_["closed"], sim)
            progress(f"  {name}: measured {sys_['closed']['throughput_per_s']:.2f}/s, "
                     f"{rows[name]['measured']['switches']} switches; simulated {sim.throughput_per_s:.2f}/s, "
                     f"{sim.switches} switches")
        predicted = [r for n, r in rows.items() if not (n == "all_resident" and stream == fitted_on)]
        runs[stream] = {"request_overhead_ms": overhead_ms, "fitted": stream == fitted_on,
                        "num_requests": st["closed"], "warmup_requests": st["warmup"],
                        "rows": rows,
                        "within_tolerance": all(abs(r["throughput_error"]) <= TOLERANCE for r in predicted),
                        "switches_within_tolerance": all(r["switch_error"] is None or abs(r["switch_error"]) <= TOLERANCE
                                                         for r in predicted)}
    return {"benchmark": "simulate_check", "memory_results": {k: memory_doc.get(k) for k in ("commit", "date")},
            "profile": str(profile_path), "profile_device": device, "tolerance": TOLERANCE,
            "runs": {n: runs[n] for n in memory_doc["runs"] if n in runs}}


def table(doc: dict) -> str:
    """The side-by-side tables (markdown), one per workload."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:+.0f}%"
    lines = [f"Memory results at {(doc['memory_results'].get('commit') or '')[:7]}; every row but the fitted one is a "
             f"prediction (tolerance {100 * doc['tolerance']:.0f}%).", ""]
    for stream, run in doc["runs"].items():
        fit = ("fitted on this workload's all-resident row" if run["fitted"]
               else "the one fitted on the components workload")
        lines += [f"**{stream}** - closed loop, {run['num_requests']} requests after {run['warmup_requests']} of "
                  f"warm-up; per-request overhead {run['request_overhead_ms']:.2f} ms ({fit}):", "",
                  "| system | simulated as | req/s measured | simulated | error | switches measured | simulated | "
                  "error | p50 ms measured | simulated |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in run["rows"].values():
            m, s = r["measured"], r["simulated"]
            lines.append(f"| {r['title']} | {r['policy']} | {m['throughput_per_s']:.2f} | {s['throughput_per_s']:.2f} "
                         f"| {pct(r['throughput_error'])} | {m['switches'] if m['switches'] is not None else '-'} | "
                         f"{s['switches']} | {pct(r['switch_error'])} | {m['p50_ms'] or 0:.0f} | {s['p50_ms']:.0f} |")
        lines += ["", f"Every predicted throughput within {100 * doc['tolerance']:.0f}%: "
                      f"{'yes' if run['within_tolerance'] else 'no'}; every predicted switch count: "
                      f"{'yes' if run['switches_within_tolerance'] else 'no'}.", ""]
    return "\n".join(lines)


def write(doc: dict, prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(table(doc))


def cmd_check(args) -> int:
    """`expertmesh bench simulate --check MEMORY_JSON [--profile P] [--out PREFIX]`."""
    path = Path(args.check)
    try:
        memory_doc = json.loads(path.read_text())
        memory_doc["settings"], [r["systems"]["all_resident"]["closed"] for r in memory_doc["runs"].values()]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"{path} is not a memory benchmark's results with an all-resident closed loop per "
                              f"workload ({type(exc).__name__})", field="--check",
                              fix="run `expertmesh bench memory` (all_resident and closed included) and pass its JSON")
    doc = provenance() | check(memory_doc, Path(args.profile) if args.profile else None,
                               progress=lambda line: print(line, flush=True))
    doc["command"] = "expertmesh " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    prefix = Path(args.out) if args.out != "bench/results/simulate" else Path("bench/results/simulate_check")
    write(doc, prefix)
    print(table(doc))
    print(f"wrote {prefix.with_suffix('.json')} and {prefix.with_suffix('.md')}")
    return 0
