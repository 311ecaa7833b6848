"""The simulator benchmark's plot: throughput per policy (with the perfect-scheduler bound), switches per policy by
the tier they loaded from, and ExpertMesh's speedup over FCFS + LRU in each sensitivity row beside CoServe's range."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

SHORT = {"expertmesh": "ExpertMesh", "fcfs_lru": "FCFS+LRU", "fcfs_fifo": "FCFS+FIFO", "round_robin": "round-robin",
         "eviction_only": "evict only", "evict_arrange": "evict+arrange", "evict_arrange_prefetch": "+prefetch"}


def plot(doc: dict, out: Path) -> None:
    names = list(doc["policies"])
    policies = [doc["policies"][n] for n in names]
    labels = [SHORT.get(n, n) for n in names]
    num_tasks = len(doc["workload"]["task_sizes"])
    fig = plt.figure(figsize=(14, 10), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 0.9])  # each lays out its own labels
    thr, sw = top.subplots(1, 2)
    sens = bottom.subplots()
    colors = ["tab:green" if n == "expertmesh" else "tab:gray" for n in names]
    thr.bar(labels, [p["throughput_per_s"] for p in policies], color=colors)
    bound = doc["headline"]["perfect_bound"]["images_per_s"]
    thr.axhline(bound, color="tab:red", linestyle="--", linewidth=1, label=f"perfect scheduler {bound:.0f}/s")
    thr.set_ylabel("images/s")
    thr.set_title("throughput")
    thr.legend()
    host = [p["loads_from_host"] / num_tasks for p in policies]
    disk = [p["loads_from_disk"] / num_tasks for p in policies]
    sw.bar(labels, host, color="tab:blue", label="from host memory")
    sw.bar(labels, disk, bottom=host, color="tab:orange", label="from disk")
    sw.set_ylabel("switches per task")
    sw.set_title("expert switches by tier")
    sw.legend()
    rows = doc["sensitivity"]
    sens.barh([r["label"] for r in rows], [r["speedup"] for r in rows], color="tab:green")
    sens.barh([r["label"] for r in rows], [r["bound_per_s"] / r["fcfs_lru_per_s"] for r in rows], fill=False,
              edgecolor="tab:red", linestyle="--", label="perfect scheduler")
    low, high = doc["paper"]["speedup_vs_fcfs_lru"]
    sens.axvspan(low, high, color="tab:olive", alpha=0.15, label=f"CoServe reports {low:g}-{high:g}x")
    sens.invert_yaxis()
    sens.set_xlabel("ExpertMesh / FCFS + LRU throughput")
    sens.set_title("one assumption changed")
    sens.legend(loc="lower right", fontsize=8)
    sens.tick_params(axis="y", labelsize=9)
    for ax in (thr, sw):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"Simulator at CoServe's scale{' (quick)' if doc.get('quick') else ''}: "
                 f"{doc['workload']['num_experts']} experts, {doc['workload']['total_gib']:.0f} GiB, "
                 f"commit {(doc.get('commit') or '?')[:8]}")
    fig.savefig(out, dpi=110)
    plt.close(fig)
