"""The memory benchmark's plot: throughput per system (closed loop, and open loop at the p99 bound), p99 against the
offered rate, switches, and peak device memory against the budget."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from expertmesh.bench.memory_table import dig  # noqa: E402

COLORS = {"expertmesh": "tab:blue", "multiplexed": "tab:red", "fcfs_lru": "tab:orange", "all_resident": "tab:gray",
          "evict_only": "tab:olive", "evict_arrange": "tab:cyan", "multiplexed_mean_k": "tab:purple",
          "expertmesh_no_host_tier": "tab:green"}


def _bars(ax, names: list[str], series: list[tuple[str, list]], ylabel: str) -> None:
    width = 0.8 / max(1, len(series))
    x = np.arange(len(names))
    for i, (label, values) in enumerate(series):
        heights = [v or 0 for v in values]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label,
                      color=[COLORS.get(n, "tab:brown") for n in names], alpha=1.0 - 0.45 * i,
                      edgecolor="black", linewidth=0.5)
        for bar, v in zip(bars, values):
            ax.annotate("-" if v is None else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)


def plot(doc: dict, out: Path) -> None:
    names = [n for n in doc.get("order") or list(doc.get("systems", {})) if n in doc.get("systems", {})]
    systems = doc["systems"]
    bound = dig(doc, "settings", "target_p99_ms")
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    thr, lat, sw, mem = axes.flat
    _bars(thr, names, [("closed loop", [dig(systems[n], "closed", "throughput_per_s") for n in names]),
                       (f"open loop, highest rate with p99 <= {bound:g} ms" if bound else "open loop",
                        [dig(systems[n], "open", "highest_rate_meeting_target_per_s") for n in names])],
          "requests/s")
    thr.set_title("throughput")
    for n in names:
        pts = sorted((p for p in dig(systems[n], "open", "points") or [] if p.get("p99_ms") is not None),
                     key=lambda p: p["offered_per_s"])
        if pts:
            lat.plot([p["offered_per_s"] for p in pts], [p["p99_ms"] for p in pts], "-o",
                     color=COLORS.get(n, "tab:brown"), label=n)
    if bound:
        lat.axhline(bound, color="black", linestyle=":", linewidth=1, label=f"p99 bound {bound:g} ms")
    lat.set_xscale("log")
    lat.set_yscale("log")
    for axis in (lat.xaxis, lat.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    lat.set_xlabel("requests/s offered (open loop)")
    lat.set_ylabel("p99 latency, ms")
    lat.grid(True, which="both", alpha=0.3)
    lat.legend(fontsize=8)
    lat.set_title("open-loop p99 latency")
    _bars(sw, names, [("switches", [dig(systems[n], "closed", "stats", "switches") for n in names])],
          "switches (closed loop)")
    sw.set_title("expert switches (loads on demand), closed loop")
    peaks = [dig(systems[n], "closed", "stats", "peak_device_bytes") for n in names]
    _bars(mem, names, [("peak", [None if v is None else v / 2**20 for v in peaks])], "MiB")
    budget = dig(doc, "workload", "device_budget_bytes")
    if budget:
        mem.axhline(budget / 2**20, color="black", linestyle=":", linewidth=1, label="device budget")
        mem.legend(fontsize=8)
    mem.set_title("peak device memory held by experts, closed loop")
    w = doc.get("workload", {})
    fig.suptitle(f"expertmesh bench memory - {(doc.get('commit') or '?')[:10]} on "
                 f"{dig(doc, 'machine', 'cpu_count') or '?'} CPUs: {w.get('num_experts', '?')} experts, device "
                 f"budget {(w.get('device_budget_bytes') or 0) / 2**20:.0f} of "
                 f"{(w.get('total_expert_bytes') or 0) / 2**20:.0f} MiB, multiplexing K = {w.get('multiplexed_k', '?')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
