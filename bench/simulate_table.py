"""The simulator benchmark's markdown: every policy, the ablation beside CoServe's, the headline against the paper's
reported shape, the perfect-scheduler bound and the sensitivity rows. Pure: a results document in, text out."""

from __future__ import annotations

GIB = 2**30


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _policy_rows(doc: dict) -> list[str]:
    num_tasks = len(doc["workload"]["task_sizes"])
    rows = ["| policy | executors | images/s | vs FCFS + LRU | switches per task | from host | from disk | "
            "fewer switches than FCFS + LRU | mean batch | p50 s | p99 s | peak device GiB | peak host GiB |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for p in doc["policies"].values():
        fewer = "-" if p["switches_vs_fcfs_lru"] is None else f"{100 * (1 - p['switches_vs_fcfs_lru']):.1f}%"
        rows.append(f"| {p['label']} | {p['num_executors']} | {p['throughput_per_s']:.1f} | "
                    f"{_x(p['speedup_vs_fcfs_lru'])} | {p['switches'] / num_tasks:,.0f} | "
                    f"{p['loads_from_host'] / num_tasks:,.0f} | {p['loads_from_disk'] / num_tasks:,.0f} | {fewer} | "
                    f"{p['mean_batch_size']:.1f} | {p['p50_ms'] / 1000:.1f} | {p['p99_ms'] / 1000:.1f} | "
                    f"{p['peak_device_bytes'] / GIB:.2f} | {p['peak_host_bytes'] / GIB:.2f} |")
    return rows


def _ablation_rows(doc: dict) -> list[str]:
    paper = doc["paper"]["ablation_images_per_s"]
    base_paper, base = paper[doc["baseline"]], doc["policies"][doc["baseline"]]["throughput_per_s"]
    rows = ["| step | CoServe images/s | CoServe vs nothing | this simulator images/s | simulator vs nothing |",
            "|---|--:|--:|--:|--:|"]
    names = {"fcfs_lru": "nothing (FCFS + LRU)", "eviction_only": "+ eviction", "evict_arrange": "+ arrange",
             "evict_arrange_prefetch": "+ prefetch", "expertmesh": "+ assign (ExpertMesh)"}
    for name in doc["ablation"]:
        ours = doc["policies"][name]["throughput_per_s"]
        theirs = _x(paper[name] / base_paper) if name in paper else "-"
        rows.append(f"| {names.get(name, name)} | {paper.get(name, '-')} | {theirs} | "
                    f"{ours:.1f} | {_x(ours / base)} |")
    return rows


def _sensitivity_rows(doc: dict) -> list[str]:
    rows = ["| one assumption changed | ExpertMesh images/s | FCFS + LRU images/s | ExpertMesh vs FCFS + LRU | "
            "switches (ExpertMesh / FCFS + LRU) | perfect scheduler images/s |", "|---|--:|--:|--:|--:|--:|"]
    for r in doc["sensitivity"]:
        rows.append(f"| {r['label']} | {r['expertmesh_per_s']:.1f} | {r['fcfs_lru_per_s']:.1f} | {_x(r['speedup'])} | "
                    f"{r['expertmesh_switches']:,} / {r['fcfs_lru_switches']:,} | {r['bound_per_s']:.1f} |")
    return rows


def _why(doc: dict) -> str:
    """The bound and the facts that set it, read off the results."""
    w, m, h = doc["workload"], doc["settings"]["machine"], doc["headline"]
    bound, base = h["perfect_bound"], doc["policies"][doc["baseline"]]
    num_tasks = len(w["task_sizes"])
    mean_bytes = w["total_bytes"] / w["num_experts"]
    on_device = (m["device_budget_bytes"] - m["activation_reserve_bytes"]) / mean_bytes
    from_host = base["loads_from_host"] / base["switches"] if base["switches"] else 0.0
    return (f"**Why:** each task calls {sum(w['distinct_experts_per_task']) / num_tasks:.0f} distinct experts; one "
            f"executor's device pool holds about {on_device:.0f} and host memory about "
            f"{m['host_budget_bytes'] / mean_bytes:.0f}, so a perfect scheduler ({bound['what']}) still loads "
            f"{bound['disk_loads'] / num_tasks:.0f} experts per task from disk and "
            f"{bound['host_loads'] / num_tasks:.0f} from host memory, and reaches {bound['images_per_s']:.1f} images/s = "
            f"{bound['speedup_vs_fcfs_lru']:.2f}x FCFS + LRU. {100 * from_host:.0f}% of FCFS + LRU's switches come "
            f"from host memory (cheap) rather than disk. ExpertMesh loads "
            f"{doc['policies']['expertmesh']['loads_from_disk'] / num_tasks:.0f} per task from disk and "
            f"{doc['policies']['expertmesh']['loads_from_host'] / num_tasks:.0f} from host memory. Each executor keeps "
            f"host copies within its share of host memory, as a pooled host replica does (the tiers are inclusive); "
            f"to make room under CoServe eviction it drops the least used copies per byte first, under the baselines "
            f"the least recently used (experts/tiering.py, the code the hosts run). One executor with arrange serves "
            f"more than two with assign here: two divide the device, and each holds fewer of a task's experts.")


def _costs(doc: dict) -> str:
    ws, m = doc["settings"]["workload"], doc["settings"]["machine"]
    mib = ws["component_mib"] * 2**20
    host_ms = m["host_load_fixed_ms"] + 1000 * mib / m["host_to_device_bytes_per_s"]
    disk_ms = m["disk_load_fixed_ms"] + 1000 * mib / m["disk_bytes_per_s"]
    c = ws["compute_scale"]
    return (f"Costs (K*n + B per batch): component experts {ws['component_k_ms'] * c:g} ms per image + "
            f"{ws['component_b_ms'] * c:g} ms (best batch {ws['component_max_batch']}), detectors "
            f"{ws['detector_k_ms'] * c:g} + {ws['detector_b_ms'] * c:g} ms (best batch {ws['detector_max_batch']}); "
            f"a {ws['component_mib']:g} MiB switch {host_ms:.0f} ms from host memory, {disk_ms:.0f} ms from disk. "
            f"A detector follows {100 * ws['trigger_probability']:.0f}% of the calls of "
            f"{100 * ws['detector_share']:.0f}% of the component types. Where each number comes from: "
            f"`settings.cost_notes` in the JSON.")


def markdown(doc: dict) -> str:
    w, m, h = doc["workload"], doc["settings"]["machine"], doc["headline"]
    ws = doc["settings"]["workload"]
    paper = doc["paper"]
    bound = h["perfect_bound"]
    met = "met" if h["target_met"] else "not met"
    lines = [
        f"# Simulator{' (quick)' if doc.get('quick') else ''}: ExpertMesh's policies at CoServe's scale",
        "",
        f"`{doc.get('command') or 'expertmesh bench simulate'}` at commit `{(doc.get('commit') or '?')[:12]}`"
        f"{' (worktree dirty)' if doc.get('worktree_dirty') else ''}, {doc.get('date', '')}. Seed {ws['seed']}; "
        f"{w['num_experts']} experts ({w['num_experts'] - w['num_detectors']} component experts of about "
        f"{ws['component_mib']:.0f} MiB, {w['num_detectors']} shared detectors), {w['total_gib']:.1f} GiB in all; "
        f"device {m['device_budget_bytes'] / GIB:.1f} GiB ({m['activation_reserve_bytes'] / GIB:.2f} GiB kept per "
        f"executor for activations), host {m['host_budget_bytes'] / GIB:.1f} GiB, disk "
        f"{m['disk_bytes_per_s'] / 1e6:.0f} MB/s, host -> device {m['host_to_device_bytes_per_s'] / 1e9:.0f} GB/s; "
        f"an image every {ws['interarrival_ms']:g} ms ({doc['settings']['offered_images_per_s']:.0f}/s offered); "
        f"{len(w['task_sizes'])} tasks of {min(w['task_sizes']):,}-{max(w['task_sizes']):,} images (each task from "
        f"the same warm start), Zipf {ws['zipf_exponent']:g} mix with a per-task factor (sigma "
        f"{ws['task_mix_sigma']:g}), {sum(w['distinct_experts_per_task']) / len(w['task_sizes']):.0f} distinct "
        f"experts per task.",
        "",
        _costs(doc),
        "",
        *_policy_rows(doc),
        "",
        f"**Headline:** ExpertMesh {h['speedup_vs_fcfs_lru']:.2f}x the throughput of FCFS + LRU with "
        f"{100 * h['switch_reduction']:.1f}% fewer switches; CoServe reports {paper['speedup_vs_fcfs_lru'][0]:g}-"
        f"{paper['speedup_vs_fcfs_lru'][1]:g}x and up to {100 * paper['max_switch_reduction']:.2f}% fewer "
        f"({paper['switches'][0]:,} -> {paper['switches'][1]:,}). Target >= {h['target_speedup']:g}x: **{met}**.",
        "",
        f"{doc['settings']['offered_images_per_s']:.0f} images/s offered is more than any policy serves, so a "
        f"task's images queue: p50 and p99 compare the policies, they are not a service level.",
        "",
        _why(doc),
        "",
        "## Ablation beside CoServe's (one task in the paper; every task here)",
        "",
        *_ablation_rows(doc),
        "",
        "## Sensitivity: ExpertMesh against FCFS + LRU with one assumption changed",
        "",
        *_sensitivity_rows(doc),
        "",
    ]
    return "\n".join(lines)
