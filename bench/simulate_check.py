"""The simulator against the memory benchmark: fed this machine's profile and the benchmark's own workload, does it
predict the measured closed-loop throughput and switches of each system? (`expertmesh bench simulate --check`)

Inputs, all from the machine and the run being predicted:
- the experts' costs from a profile of the benchmark's CoE on this machine (`expertmesh profile --spec <its spec>`):
  K and B, the best batch, bytes, the measured host -> device and disk -> device load times
  (`simulate_profile.experts_from_profile`);
- the requests the benchmark's closed loop sent (the same seed, order and stations), each as the chain of expert calls
  it really makes: the CoE is run offline on each request's image (`experts.offline`-style waves), so the triggered
  dependent calls are the ones serving made (every system gives the same answers);
- the benchmark's budgets, stations, warm-up and arrange wait bound; one executor, as the benchmark's one host
  replica; closed loop (`SimConfig.closed_loop_stations`): each station sends its next request when its last one
  was answered, after the warm-up requests ran to their end (the counters start after them, as the benchmark's).

One number is fitted, on one row only. The profile times the model alone; a replica also spends time on every
call outside it (Serve's request handling, deserialising the images, the event loop), serially with compute on its
one CPU. That per-call overhead is set so that the simulated every-expert-resident run (no switches) has the
measured throughput; its p50 latency then is a check, not a fit. Every other row is a prediction. The prefetch of
(a) is not simulated (it loaded nothing in the runs so far), and Serve multiplexing is not a policy of the simulator;
both are said in the table.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from expertmesh.bench.memory_run import MemorySettings, workload_zoo, served_experts
from expertmesh.bench.memory_workload import build_workload_coe
from expertmesh.bench.provenance import provenance
from expertmesh.bench.memory_workload_requests import WorkloadRequest, make_requests, request_images
from expertmesh.cluster.simulate import POLICIES, SimConfig, SimExpert, SimRequest, SimResult, simulate
from expertmesh.cluster.simulate_profile import experts_from_profile
from expertmesh.errors import FailedPrecondition, InvalidArgument
from expertmesh.experts.offline import load_runtime, predict
from expertmesh.experts.spec import CoESpec, load_spec
from expertmesh.profiler.store import ProfileStore
from expertmesh.router.plan import Call, ExpertOutput, Reason
from expertmesh.router.waves import PlanInFlight, record, take_calls

# measured system -> (simulator policy, host tier kept, budget lifted, what the simulator leaves out)
SYSTEMS: dict[str, tuple[str, bool, bool, str]] = {
    "all_resident": ("evict_arrange", False, True, "the fitted row: its throughput sets the per-call overhead"),
    "expertmesh": ("evict_arrange", True, False, "prefetch not simulated"),
    "expertmesh_no_host_tier": ("evict_arrange", False, False, "prefetch not simulated"),
    "fcfs_lru": ("fcfs_lru", True, False, ""),
    "evict_only": ("eviction_only", True, False, ""),
    "evict_arrange": ("evict_arrange", True, False, ""),
}
TOLERANCE = 0.20  # the bar: within 20% of the measured figure


def request_chains(spec: CoESpec, zoo: Path, requests: Sequence[WorkloadRequest],
                   progress: Callable[[str], object] = print) -> list[tuple[str, ...]]:
    """Each request's expert calls in the order serving makes them (its first calls, then the calls their outputs
    trigger, wave by wave), from the CoE run offline on its image."""
    images = [request_images(spec, r) for r in requests]
    plans = {i: PlanInFlight.start(Call(e, Reason.TABLE) for e in r.calls) for i, r in enumerate(requests)}
    runtimes = {}
    while wave := take_calls(plans):
        for name, items in wave.items():
            if name not in runtimes:
                runtimes[name] = load_runtime(spec, spec.expert(name), zoo)
            size = spec.expert(name).input_size_px
            batch = np.concatenate([images[i][size] for i, _ in items])
            for (i, call), pred in zip(items, predict(runtimes[name], batch)):
                record(spec, plans[i], call, ExpertOutput(name, pred.label, pred.score))
        progress(f"  chains: a wave of {sum(len(v) for v in wave.values())} calls over {len(wave)} experts")
    return [tuple(c.expert for c, _ in plans[i].done) for i in range(len(requests))]


def sim_config(workload: Mapping, s: MemorySettings, *, host_tier: bool, lifted: bool,
               call_overhead_ms: float) -> SimConfig:
    device = int(workload["device_budget_bytes"])
    total = int(workload["total_expert_bytes"])
    return SimConfig(device_budget_bytes=2 * total if lifted else device,
                     host_budget_bytes=int(workload["host_budget_bytes"]) if host_tier else 0,
                     num_parallel_executors=1, activation_reserve_bytes=0,
                     host_to_device_bytes_per_s=1e9, disk_bytes_per_s=1e9,  # unused: every load time is measured
                     max_wait_ms=1000.0 * s.max_wait_s, closed_loop_stations=s.num_stations,
                     warmup_requests=s.warmup_requests, call_overhead_ms=call_overhead_ms,
                     turnaround_ms=0.0)  # the benchmark's driver sends a station's next request at once


def fit_call_overhead(experts: Mapping[str, SimExpert], requests: Sequence[SimRequest],
                      config: Callable[[float], SimConfig], measured_per_s: float) -> float:
    """The per-call overhead (ms) at which the simulated all-resident throughput equals the measured one (bisection;
    0 when even with none the simulation is slower)."""
    def rate(overhead_ms: float) -> float:
        return simulate(experts, requests, config(overhead_ms), POLICIES["evict_arrange"]).throughput_per_s
    lo, hi = 0.0, 8.0
    if rate(lo) <= measured_per_s:
        return 0.0
    while rate(hi) > measured_per_s and hi < 1e4:
        hi *= 2
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) > measured_per_s else (lo, mid)
    return (lo + hi) / 2


def check(memory_doc: dict, profile_path: Path | None = None, device: str = "cpu",
          progress: Callable[[str], object] = print) -> dict:
    """Predict every simulatable system of a memory benchmark results document; measured beside predicted. The
    profile: `profile_path`, else <the benchmark's zoo>/profile.json."""
    s = MemorySettings.model_validate({k: v for k, v in memory_doc["settings"].items()
                                       if k in MemorySettings.model_fields})
    spec_path = Path(build_workload_coe(s.workload_path(), s.workload_config(), progress=progress))
    spec = load_spec(spec_path)
    zoo = workload_zoo(spec, spec_path)
    profile_path = profile_path or zoo / "profile.json"
    if not profile_path.exists():
        raise FailedPrecondition(f"no profile of the benchmark's CoE at {profile_path}", field="--profile",
                                 fix=f"expertmesh profile --spec {spec_path} --out {profile_path} --usage spec")
    experts = experts_from_profile(ProfileStore.load(profile_path), device)
    served = served_experts(spec)
    missing = sorted(set(served) - set(experts))
    if missing:
        raise FailedPrecondition(f"the profile has no {device} entries for {', '.join(missing[:5])}", field="profile",
                                 fix=f"profile the benchmark's CoE: expertmesh profile --spec {spec_path} --zoo {zoo} "
                                     f"--usage spec")
    all_requests = make_requests(spec, s.warmup_requests + s.closed_requests, seed=s.request_seed, zipf_s=s.zipf_s,
                                 num_stations=s.num_stations)
    t0 = time.perf_counter()
    chains = request_chains(spec, zoo, all_requests, progress)
    measured_chains = chains[s.warmup_requests:]
    progress(f"  chains of {len(chains)} requests in {time.perf_counter() - t0:.1f} s "
             f"({sum(map(len, measured_chains)) / len(measured_chains):.2f} calls each after the warm-up)")
    requests = [SimRequest(0.0, chain) for chain in chains]
    measured = memory_doc["systems"]
    ref = measured["all_resident"]["closed"]["throughput_per_s"]
    overhead_ms = fit_call_overhead(experts, requests, lambda o: sim_config(
        memory_doc["workload"], s, host_tier=False, lifted=True, call_overhead_ms=o), ref)
    progress(f"  per-call overhead fitted on the all-resident row: {overhead_ms:.2f} ms")
    rows = {}
    for name, (policy, host_tier, lifted, note) in SYSTEMS.items():
        if name not in measured or "closed" not in measured[name]:
            continue
        config = sim_config(memory_doc["workload"], s, host_tier=host_tier, lifted=lifted, call_overhead_ms=overhead_ms)
        sim: SimResult = simulate(experts, requests, config, POLICIES[policy])
        real = measured[name]["closed"]
        real_switches = (real.get("stats") or {}).get("switches")
        rows[name] = {"title": measured[name]["title"], "policy": policy, "note": note,
                      "measured": {"throughput_per_s": real["throughput_per_s"], "switches": real_switches,
                                   "p50_ms": real.get("p50_ms"), "p99_ms": real.get("p99_ms")},
                      "simulated": {"throughput_per_s": sim.throughput_per_s, "switches": sim.switches,
                                    "loads_from_host": sim.loads_from_host, "loads_from_disk": sim.loads_from_disk,
                                    "p50_ms": sim.p50_ms, "p99_ms": sim.p99_ms}}
        r = rows[name]
        r["throughput_error"] = sim.throughput_per_s / real["throughput_per_s"] - 1.0
        r["switch_error"] = (sim.switches / real_switches - 1.0) if real_switches else None
        r["p50_error"] = (sim.p50_ms / real["p50_ms"] - 1.0) if real.get("p50_ms") else None
        progress(f"  {name}: measured {real['throughput_per_s']:.1f}/s, {real_switches} switches; simulated "
                 f"{sim.throughput_per_s:.1f}/s, {sim.switches} switches")
    predicted = [r for n, r in rows.items() if n != "all_resident"]
    within = all(abs(r["throughput_error"]) <= TOLERANCE and (r["switch_error"] is None
                 or abs(r["switch_error"]) <= TOLERANCE) for r in predicted)
    return {"benchmark": "simulate_check", "memory_results": {k: memory_doc.get(k) for k in ("commit", "date")},
            "profile": str(profile_path), "profile_device": device, "num_requests": len(measured_chains),
            "warmup_requests": s.warmup_requests,
            "mean_calls_per_request": sum(map(len, measured_chains)) / len(measured_chains),
            "call_overhead_ms": overhead_ms, "tolerance": TOLERANCE, "rows": rows, "within_tolerance": within}


def table(doc: dict) -> str:
    """The side-by-side table (markdown)."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:+.0f}%"
    lines = [f"Closed loop, {doc['num_requests']} requests after {doc['warmup_requests']} of warm-up "
             f"({doc['mean_calls_per_request']:.2f} expert calls each); per-call overhead "
             f"{doc['call_overhead_ms']:.1f} ms fitted on the all-resident row's throughput; memory results at "
             f"{(doc['memory_results'].get('commit') or '')[:7]}:", "",
             "| system | simulated as | req/s measured | simulated | error | switches measured | simulated | error "
             "| p50 ms measured | simulated | left out |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in doc["rows"].values():
        m, s = r["measured"], r["simulated"]
        lines.append(f"| {r['title']} | {r['policy']} | {m['throughput_per_s']:.1f} | {s['throughput_per_s']:.1f} | "
                     f"{pct(r['throughput_error'])} | {m['switches'] if m['switches'] is not None else '-'} | "
                     f"{s['switches']} | {pct(r['switch_error'])} | {m['p50_ms']:.0f} | {s['p50_ms']:.0f} | "
                     f"{r['note'] or '-'} |")
    lines.append("")
    lines.append(f"Every predicted row within {100 * doc['tolerance']:.0f}% (throughput and switches): "
                 f"{'yes' if doc['within_tolerance'] else 'no'}.")
    return "\n".join(lines) + "\n"


def write(doc: dict, prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(table(doc))


def cmd_check(args) -> int:
    """`expertmesh bench simulate --check MEMORY_JSON [--profile P] [--out PREFIX]`."""
    path = Path(args.check)
    try:
        memory_doc = json.loads(path.read_text())
        memory_doc["settings"], memory_doc["systems"]["all_resident"]["closed"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"{path} is not a memory benchmark's results with an all-resident closed loop "
                              f"({type(exc).__name__})", field="--check",
                              fix="run `expertmesh bench memory` (all_resident and closed included) and pass its JSON")
    doc = provenance() | check(memory_doc, Path(args.profile) if args.profile else None,
                               progress=lambda line: print(line, flush=True))
    doc["command"] = "expertmesh " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    prefix = Path(args.out) if args.out != "bench/results/simulate" else Path("bench/results/simulate_check")
    write(doc, prefix)
    print(table(doc))
    print(f"wrote {prefix.with_suffix('.json')} and {prefix.with_suffix('.md')}")
    return 0
