"""Latency against batch size per expert, measured medians with their spread and the fitted lines (PNG)."""

from __future__ import annotations

import math
from pathlib import Path

from expertmesh.profiler.store import ExpertProfile


def plot_profiles(profiles: list[ExpertProfile], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(profiles))
    rows = math.ceil(len(profiles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, p in zip(axes.flat, profiles):
        xs = [b.batch_size for b in p.batches]
        ys = [b.median_ms for b in p.batches]
        err = [[b.median_ms - b.p10_ms for b in p.batches], [b.p90_ms - b.median_ms for b in p.batches]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", ms=4, capsize=2, label="median (p10-p90)")
        line_x = [min(xs), max(xs)]
        ax.plot(line_x, [p.fit.predict_ms(x) for x in line_x], "-",
                label=f"{p.fit.k_ms_per_item:.2f}·n + {p.fit.b_ms:.2f} ms (R²={p.fit.r2:.3f})")
        ax.axvline(p.max_useful_batch, color="grey", ls=":", lw=1, label=f"largest useful batch {p.max_useful_batch}")
        ax.set_title(f"{p.expert} [{p.device}]", fontsize=10)
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency ms")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(profiles):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
