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

COLORS = {"expertmesh": "tab:blue", "multiplexed_best": "tab:red", "multiplexed": "salmon", "fcfs_lru": "tab:orange",
          "all_resident": "tab:gray", "evict_only": "tab:olive", "evict_arrange": "tab:cyan",
          "multiplexed_mean_k": "tab:purple", "expertmesh_2x_pow2": "tab:pink", "expertmesh_2x_assign": "tab:green"}


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


def _latency(ax, run: dict, names: list[str], bound) -> None:
    systems = run["systems"]
    for n in names:
        pts = sorted((p for p in dig(systems[n], "open", "points") or [] if p.get("p99_ms") is not None),
                     key=lambda p: p["offered_per_s"])
        if pts:
            ax.plot([p["offered_per_s"] for p in pts], [p["p99_ms"] for p in pts], "-o",
                    color=COLORS.get(n, "tab:brown"), label=n)
    if bound:
        ax.axhline(bound, color="black", linestyle=":", linewidth=1, label=f"p99 bound {bound:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("requests/s offered (open loop)")
    ax.set_ylabel("p99 latency, ms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot(doc: dict, out: Path) -> None:
    """One row per workload: throughput (closed, open at the bound), p99 against the offered rate, switches."""
    runs = doc.get("runs") or {}
    fig, axes = plt.subplots(max(1, len(runs)), 3, figsize=(17, 5.2 * max(1, len(runs))), squeeze=False)
    for (workload, run), (thr, lat, sw) in zip(runs.items(), axes):
        systems = run.get("systems", {})
        names = [n for n in run.get("order") or list(systems) if n in systems and not systems[n].get("error")]
        bound = dig(run, "stream", "target_p99_ms")
        _bars(thr, names, [("closed loop", [dig(systems[n], "closed", "throughput_per_s") for n in names]),
                           (f"open loop, highest rate with p99 <= {bound:g} ms" if bound else "open loop",
                            [dig(systems[n], "open", "highest_rate_meeting_target_per_s") for n in names])],
              "requests/s")
        thr.set_title(f"{workload}: throughput")
        _latency(lat, run, names, bound)
        lat.set_title(f"{workload}: open-loop p99 latency")
        _bars(sw, names, [("switches", [dig(systems[n], "closed", "stats", "switches") for n in names])],
              "switches (closed loop)")
        sw.set_title(f"{workload}: expert switches (loads on demand), closed loop")
    w = doc.get("workload", {})
    fig.suptitle(f"expertmesh bench memory - {(doc.get('commit') or '?')[:10]} on "
                 f"{dig(doc, 'machine', 'cpu_count') or '?'} CPUs (systems on {dig(doc, 'pinned', 'system_cores')}): "
                 f"{w.get('num_experts', '?')} experts, {(w.get('device_budget_bytes') or 0) / 2**20:.0f} MiB on the "
                 f"device and {(w.get('host_budget_bytes') or 0) / 2**20:.0f} MiB in host memory of "
                 f"{(w.get('total_expert_bytes') or 0) / 2**20:.0f} MiB")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
