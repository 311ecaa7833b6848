"""The throughput benchmark's plot: achieved throughput and p99 latency against the offered rate, for single
Inspect (with the no-op Serve app) and for boards, with the offline bound and the design before where given."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

SERIES = (("noop", "no-op Serve app", "tab:gray"), ("single", "ExpertMesh single", "tab:blue"),
          ("board", "ExpertMesh boards of 50", "tab:green"))


def _xy(sweep: dict, y: str, per_component: bool) -> tuple[list[float], list[float]]:
    scale = sweep["components_per_request"] if per_component else 1
    pts = sorted((p for p in sweep["points"] if p.get(y) is not None), key=lambda p: p["offered_per_s"])
    return [p["offered_per_s"] * scale for p in pts], [p[y] for p in pts]


def plot(doc: dict, out: Path, before: dict | None = None) -> None:
    """Two rows (single requests, boards) of (achieved components/s, p99 ms) against the offered components/s."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    runs = [(doc, "-", "o", "")] + ([(before, "--", "x", " (before)")] if before else [])
    for row, keys in enumerate((("noop", "single"), ("board",))):
        thr, lat = axes[row]
        for d, style, marker, suffix in runs:
            for key, label, color in SERIES:
                if key not in keys or not d.get(key):
                    continue
                x, y = _xy(d[key], "achieved_components_per_s", True)
                thr.plot(x, y, style, marker=marker, color=color, label=label + suffix)
                x, y = _xy(d[key], "p99_ms", True)
                lat.plot(x, y, style, marker=marker, color=color, label=label + suffix)
            for key, label, color in SERIES:
                over = ((d.get("overload") or {}).get(key) or {}).get("point") if key in keys else None
                if over:
                    scale = d[key]["components_per_request"] if d.get(key) else 1
                    thr.plot([over["offered_per_s"] * scale], [over["achieved_components_per_s"]], marker="*",
                             markersize=12, linestyle="none", color=color, label=f"overload{suffix}")
            bound = (d.get("offline") or {}).get("components_per_s")
            if bound:
                thr.axhline(bound, color="tab:red", linestyle=style, linewidth=1,
                            label=f"offline bound{suffix} {bound:.0f}/s")
        target = 1000.0 if row else 250.0
        lat.axhline(target, color="black", linestyle=":", linewidth=1, label=f"p99 target {target:g} ms")
        unit = "components/s offered (boards/s x 50)" if row else "requests/s offered"
        for ax in (thr, lat):
            ax.set_xscale("log")
            ax.set_xlabel(unit)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        thr.set_yscale("log")
        thr.set_ylabel("achieved components/s (no-op: requests/s)" if not row else "achieved components/s")
        lat.set_yscale("log")
        lat.set_ylabel("p99 latency, ms" + (" (whole board)" if row else ""))
    commit = (doc.get("commit") or "?")[:10]
    fig.suptitle(f"expertmesh bench throughput - {commit} on {doc.get('machine', {}).get('cpu_count', '?')} CPUs"
                 + (f" vs before {(before.get('commit') or '?')[:10]}" if before else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
