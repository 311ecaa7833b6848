"""`expertmesh bench simulate`: the simulator at CoServe's scale, every policy, and what bounds the result.

Builds the seeded workload (bench/simulate_workload.py), runs it through every policy of cluster/simulate.py, and
writes PREFIX.json (commit, settings, per-policy results), PREFIX.md (the table beside CoServe's reported shape) and
PREFIX.png (the plot). Besides the policies it records a bound (what a perfect scheduler could reach: each task's
missing experts loaded once, compute batched fully, loads overlapping compute) and a sensitivity set (ExpertMesh
against FCFS + LRU with one assumption changed at a time), so the headline's reasons can be read off the file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from expertmesh.bench.provenance import provenance
from expertmesh.bench.simulate_plot import plot
from expertmesh.bench.simulate_table import markdown
from expertmesh.bench.simulate_workload import COST_NOTES, WorkloadSettings, build_workload, describe, machine
from expertmesh.cluster.simulate import (ABLATION, BASELINE, POLICIES, SimConfig, SimExpert, SimRequest,
                                         SimResult, simulate_policies)
from expertmesh.experts.tiering import warm_plan

PAPER = {"source": "CoServe (ASPLOS 2025), ../shared/background.md",
         "speedup_vs_fcfs_lru": [4.5, 12.0], "max_switch_reduction": 0.9387, "switches": [1060, 65],
         "ablation_images_per_s": {"fcfs_lru": 4.5, "eviction_only": 5.8, "evict_arrange": 11.8, "expertmesh": 26.3}}
TARGET_SPEEDUP = 4.5
#: One assumption changed at a time: (label, workload overrides, machine overrides, ExpertMesh policy overrides).
#: A board type's component types are given at CoServe's scale (of 350) and scaled with a smaller workload.
SENSITIVITY: tuple[tuple[str, dict, dict, dict], ...] = (
    ("board types of {n} component types (each task)", {"categories_per_task": 200}, {}, {}),
    ("board types of {n} component types (each task)", {"categories_per_task": 100}, {}, {}),
    ("every task the factory mix (sigma 0)", {"task_mix_sigma": 0.0}, {}, {}),
    ("flat mix (Zipf exponent 0)", {"zipf_exponent": 0.0}, {}, {}),
    ("no host-memory tier (every switch from disk)", {}, {"host_budget_bytes": 0}, {}),
    ("CoServe's ~35 ms inference (K and B x2.7)", {"compute_scale": 2.7}, {}, {}),
    ("1 executor for ExpertMesh", {}, {"num_parallel_executors": 1}, {}),
    ("3 executors for ExpertMesh", {}, {"num_parallel_executors": 3}, {}),
    ("ExpertMesh without prefetch", {}, {}, {"prefetch": False}),
)



def perfect_bound(experts: dict[str, SimExpert], requests: list[SimRequest], config: SimConfig) -> dict:
    """What no scheduler can beat on this machine (one executor's warm start): per task, every expert it calls that
    is not in the device pool at the start is loaded once (from the host tier if it starts there, else disk); every
    expert's calls run in full best batches; loads overlap compute. Throughput <= requests / sum of task times."""
    warm = warm_plan(list(experts), {e: x.num_bytes for e, x in experts.items()},
                     {e: x.usage for e, x in experts.items()}, device_budget_bytes=config.pool_budget_bytes(1),
                     host_budget_bytes=config.host_budget_bytes)
    on_device, in_host = set(warm.device), set(warm.host) - set(warm.device)
    total_ms, disk_loads, host_loads = 0.0, 0, 0
    for task in sorted({r.task for r in requests}):
        calls = Counter(e for r in requests if r.task == task for e in r.chain)
        need = set(calls) - on_device
        from_host = need & in_host
        load_ms = sum(config.host_load_fixed_ms + 1000.0 * experts[e].num_bytes / config.host_to_device_bytes_per_s
                      for e in from_host)
        load_ms += sum(config.disk_load_fixed_ms + 1000.0 * experts[e].num_bytes / config.disk_bytes_per_s
                       for e in need - in_host)
        compute_ms = sum(experts[e].k_ms_per_item * n + experts[e].b_ms * math.ceil(n / experts[e].max_batch)
                         for e, n in calls.items())
        total_ms += max(load_ms, compute_ms)
        disk_loads += len(need - in_host)
        host_loads += len(from_host)
    return {"images_per_s": len(requests) / (total_ms / 1000.0), "disk_loads": disk_loads, "host_loads": host_loads,
            "what": "from one executor's warm start, each task's experts not on the device loaded once, full "
                    "batches, loads overlapping compute"}


def _sensitivity_row(label: str, workload_over: dict, machine_over: dict, policy_over: dict, em: SimResult,
                     base: SimResult, bound: dict) -> dict:
    return {"label": label, "workload_overrides": workload_over, "machine_overrides": machine_over,
            "expertmesh_policy_overrides": policy_over,
            "expertmesh_per_s": em.throughput_per_s, "fcfs_lru_per_s": base.throughput_per_s,
            "speedup": em.throughput_per_s / base.throughput_per_s, "expertmesh_switches": em.switches,
            "fcfs_lru_switches": base.switches, "bound_per_s": bound["images_per_s"]}


def _sensitivity(base: WorkloadSettings, say: Callable[[str], None]) -> list[dict]:
    """ExpertMesh and FCFS + LRU with one assumption changed (the run itself is the first row, added by the caller)."""
    rows = []
    for label, workload_over, machine_over, policy_over in SENSITIVITY:
        if "categories_per_task" in workload_over:
            n = max(1, round(workload_over["categories_per_task"] * base.num_component_experts / 350))
            workload_over, label = {"categories_per_task": n}, label.format(n=f"{n} of {base.num_component_experts}")
        ws = base.model_copy(update=workload_over)
        experts, requests = build_workload(ws)
        config = machine(ws).model_copy(update=machine_over)
        policies = {"expertmesh": POLICIES["expertmesh"].model_copy(update=policy_over), BASELINE: POLICIES[BASELINE]}
        out = simulate_policies(experts, requests, config, policies)
        rows.append(_sensitivity_row(label, workload_over, machine_over, policy_over, out["expertmesh"],
                                     out[BASELINE], perfect_bound(experts, requests, config)))
        say(f"  sensitivity: {label}: {rows[-1]['speedup']:.2f}x ({rows[-1]['expertmesh_per_s']:.1f} vs "
            f"{rows[-1]['fcfs_lru_per_s']:.1f} images/s)")
    return rows


def run_simulation(workload: WorkloadSettings, *, quick: bool, say: Callable[[str], None] = print) -> dict:
    started = time.monotonic()
    experts, requests = build_workload(workload)
    config = machine(workload)
    info = describe(experts, requests)
    say(f"workload: {info['num_experts']} experts, {info['total_gib']:.1f} GiB, {info['num_requests']} requests "
        f"in {len(info['task_sizes'])} task(s); device {config.device_budget_bytes / 2**30:.1f} GiB, host "
        f"{config.host_budget_bytes / 2**30:.1f} GiB")

    def progress(name: str, r: SimResult) -> None:
        say(f"{name}: {r.throughput_per_s:.1f} images/s, {r.switches} switches ({r.loads_from_host} from host, "
            f"{r.loads_from_disk} from disk), p50 {r.p50_ms / 1000:.1f} s, p99 {r.p99_ms / 1000:.1f} s")
    results = simulate_policies(experts, requests, config, POLICIES, progress)
    base = results[BASELINE]
    policies = {}
    for name, r in results.items():
        policies[name] = {"label": POLICIES[name].label, **POLICIES[name].model_dump(mode="json"), **r.to_dict(),
                          "speedup_vs_fcfs_lru": r.throughput_per_s / base.throughput_per_s,
                          "switches_vs_fcfs_lru": r.switches / base.switches if base.switches else None}
    em = policies["expertmesh"]
    bound = perfect_bound(experts, requests, config)
    say(f"ExpertMesh {em['speedup_vs_fcfs_lru']:.2f}x FCFS + LRU (target {TARGET_SPEEDUP}x), "
        f"{100 * (1 - em['switches_vs_fcfs_lru']):.1f}% fewer switches; a perfect scheduler: "
        f"{bound['images_per_s']:.1f} images/s = {bound['images_per_s'] / base.throughput_per_s:.2f}x")
    return {"benchmark": "simulate", **provenance(), "quick": quick,
            "settings": {"workload": workload.model_dump(mode="json"), "machine": config.model_dump(mode="json"),
                         "offered_images_per_s": 1000.0 / workload.interarrival_ms, "cost_notes": COST_NOTES},
            "workload": info, "policies": policies, "ablation": list(ABLATION), "baseline": BASELINE,
            "headline": {"speedup_vs_fcfs_lru": em["speedup_vs_fcfs_lru"],
                         "switch_reduction": 1 - em["switches_vs_fcfs_lru"], "target_speedup": TARGET_SPEEDUP,
                         "target_met": em["speedup_vs_fcfs_lru"] >= TARGET_SPEEDUP,
                         "perfect_bound": bound | {"speedup_vs_fcfs_lru": bound["images_per_s"]
                                                   / base.throughput_per_s}},
            "paper": PAPER,
            "sensitivity": [_sensitivity_row("as run", {}, {}, {}, results["expertmesh"], base, bound)]
            + _sensitivity(workload, say),
            "wall_s": round(time.monotonic() - started, 1)}


def write_results(doc: dict, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_name(out.name + ext) for ext in (".json", ".md", ".png")]
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    paths[1].write_text(markdown(doc))
    plot(doc, paths[2])
    return paths


def cmd_bench_simulate(args: argparse.Namespace) -> int:
    overrides = {"seed": args.seed} | ({"num_tasks": args.num_tasks} if args.num_tasks else {})
    workload = WorkloadSettings.quick(**overrides) if args.quick else WorkloadSettings(**overrides)
    doc = run_simulation(workload, quick=args.quick, say=lambda line: print(line, flush=True))
    doc["command"] = "expertmesh " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    for path in write_results(doc, Path(args.out)):
        print(f"wrote {path}")
    return 0
