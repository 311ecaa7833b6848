"""The accuracy report's tables as text, from the report's JSON form (`AccuracyReport.model_dump()`).

One formatter for `expertmesh zoo report` and the README's accuracy figure (bench/figure_blocks.py), kept free of
torch and the models so the README check can render it without loading them.
"""

from __future__ import annotations


def accuracy_tables(report: dict) -> str:
    """Per-expert accuracy, the router's, and the systems (CoE, and the monolithic baseline when present)."""
    lines = [f"{'expert':<24}{'accuracy':>10}{'images':>9}{'params':>11}", "-" * 54]
    lines += [f"{e['expert']:<24}{e['accuracy']:>10.4f}{e['num_images']:>9}{e['num_parameters']:>11,}"
              for e in report["experts"]]
    lines += ["", f"router accuracy (component type): {report['router_accuracy']:.4f}", "",
              f"{'system':<14}{'verdict acc':>12}{'defect acc':>12}{'uncertain':>10}{'active params':>15}{'total params':>14}",
              "-" * 77]
    rows = [("CoE", report["coe"])] + ([("monolithic", report["monolithic"])] if report.get("monolithic") else [])
    lines += [f"{name:<14}{s['verdict_accuracy']:>12.4f}{s['defect_accuracy']:>12.4f}{s['num_uncertain']:>10}"
              f"{s['active_parameters_per_image']:>15,.0f}{s['total_parameters']:>14,}" for name, s in rows]
    lines.append(f"\nCoE calls {report['coe']['mean_experts_per_image']:.2f} models per image (router included).")
    return "\n".join(lines)
