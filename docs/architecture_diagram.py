"""The source of docs/architecture.png, the README's picture of ExpertMesh: `python docs/architecture_diagram.py`
redraws it (matplotlib, which the project already needs for its plots). Boxes are processes or deployments; solid
arrows are a request's path, dashed ones control and metrics."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "architecture.png"
#: name -> (x, y, width, height, title, lines, colour); units are the figure's data coordinates (0..18 x 0..9)
BOXES = {
    "station": (0.2, 5.6, 2.4, 1.6, "Line-side stations", ["gRPC :9000, HTTP :8000", "a token per factory"], "#f2f2f2"),
    "proxy": (3.5, 5.6, 2.2, 1.6, "Serve proxies", ["gRPC + reflection,", "HTTP, health"], "#dde8f6"),
    "ingress": (6.4, 5.6, 2.8, 1.6, "Ingress", ["auth, quotas, admission,", "decode + resize, batching"], "#dde8f6"),
    "router": (9.9, 5.6, 2.8, 1.6, "Router", ["classifier, table + rules,", "plans in waves, canary"], "#dde8f6"),
    "metrics": (15.3, 5.6, 2.5, 1.6, "Prometheus, Grafana", ["expert hits, latency,", "tiers, re-plans"], "#f2f2f2"),
    "profiler": (0.2, 1.9, 2.6, 1.8, "Offline profiler + zoo", ["latency x batch, memory,", "load time per tier"],
                 "#fbeed5"),
    "controller": (3.7, 1.5, 2.9, 2.6, "Placement controller", ["dependency graph + profiles", "-> experts per node,",
                                                               "re-plans on node loss,", "memory or traffic change"],
                   "#fbeed5"),
    "hosts": (7.5, 1.5, 3.9, 2.6, "Pooled expert hosts", ["one per GPU node, many experts,", "device / host / disk tiers,",
                                                          "arrange + dependency-aware", "eviction, dependent calls local"],
              "#e3f1df"),
    "hot": (12.1, 1.9, 2.3, 1.8, "Hot experts", ["own autoscaled", "deployments"], "#e3f1df"),
}
#: (from, to, label, dashed)
ARROWS = [("station", "proxy", "", False), ("proxy", "ingress", "", False), ("ingress", "router", "batch", False),
          ("router", "hosts", "calls by host", False), ("router", "hot", "", False),
          ("profiler", "controller", "profiles", True), ("controller", "hosts", "placement", True),
          ("router", "metrics", "metrics", True)]


def anchor(name: str, toward: str) -> tuple[float, float]:
    """The middle of the side of box `name` that faces box `toward`."""
    x, y, w, h = BOXES[name][:4]
    tx, ty, tw, th = BOXES[toward][:4]
    cx, cy, tcx, tcy = x + w / 2, y + h / 2, tx + tw / 2, ty + th / 2
    if abs(tcx - cx) / (w + tw) > abs(tcy - cy) / (h + th):
        return (x + w if tcx > cx else x), cy
    return cx, (y + h if tcy > cy else y)


def draw(out: Path = OUT) -> Path:
    fig, ax = plt.subplots(figsize=(18, 8.2), dpi=90)
    ax.set_xlim(0, 18)
    ax.set_ylim(0.6, 8.6)
    ax.axis("off")
    ax.text(9, 8.2, "ExpertMesh: a request's path (solid) and the control loop (dashed)", ha="center", fontsize=15,
            weight="bold")
    ax.add_patch(FancyBboxPatch((3.3, 0.85), 11.4, 6.6, boxstyle="round,pad=0.05", fill=False, ls=":", ec="#888"))
    ax.text(14.6, 1.0, "one Ray cluster: KubeRay in production, several nodes on loopback in development",
            ha="right", va="bottom", fontsize=9, color="#555")
    for x, y, w, h, title, lines, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.06", fc=colour, ec="#444"))
        ax.text(x + w / 2, y + h - 0.32, title, ha="center", va="center", fontsize=11.5, weight="bold")
        ax.text(x + w / 2, y + h - 0.62, "\n".join(lines), ha="center", va="top", fontsize=9.5, linespacing=1.35)
    for a, b, label, dashed in ARROWS:
        start, end = anchor(a, b), anchor(b, a)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, lw=1.6,
                                     ls="--" if dashed else "-", color="#555" if dashed else "#1f4e8c"))
        if label:
            ax.text((start[0] + end[0]) / 2 + 0.1, (start[1] + end[1]) / 2 + 0.12, label, fontsize=9, color="#333")
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
