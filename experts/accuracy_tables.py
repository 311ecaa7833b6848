"""The accuracy report's tables as text, from the report's JSON form (`AccuracyReport.model_dump()`).

One formatter for `expertmesh zoo report` and the README's accuracy figure (bench/figure_blocks.py), kept free of
torch and the models so the README check can render it without loading them.
"""

from __future__ import annotations

from expertmesh.experts.line_figures import confusion_lines

SYSTEMS = (("CoE", "coe"), ("mono (active)", "monolithic"), ("mono (total)", "monolithic_total"))


def accuracy_tables(report: dict) -> str:
    """Per-expert accuracy, the router's, and the systems: the CoE, and the monolithic baselines present (matched
    active parameters per image, matched total parameters)."""
    timed = any(e.get("train_seconds") is not None for e in report["experts"])
    lines = [f"{'expert':<24}{'accuracy':>10}{'images':>9}{'params':>11}" + (f"{'train s':>9}" if timed else ""),
             "-" * (63 if timed else 54)]
    lines += [f"{e['expert']:<24}{e['accuracy']:>10.4f}{e['num_images']:>9}{e['num_parameters']:>11,}"
              + ((f"{e['train_seconds']:>9.1f}" if e.get("train_seconds") is not None else f"{'-':>9}") if timed else "")
              for e in report["experts"]]
    lines += ["", f"router accuracy (category): {report['router_accuracy']:.4f}", "",
              f"{'system':<14}{'verdict acc':>12}{'defect recall':>15}{'defect acc':>12}{'uncertain':>10}"
              f"{'active params':>15}{'total params':>14}", "-" * 92]
    rows = [(name, report[key]) for name, key in SYSTEMS if report.get(key)]
    lines += [f"{name:<14}{s['verdict_accuracy']:>12.4f}"
              + (f"{s['defect_recall']:>15.4f}" if s.get("defect_recall") is not None else f"{'-':>15}")
              + f"{s['defect_accuracy']:>12.4f}{s['num_uncertain']:>10}"
              f"{s['active_parameters_per_image']:>15,.0f}{s['total_parameters']:>14,}" for name, s in rows]
    figures = confusion_lines(report["coe"])
    if figures:
        lines += ["", "CoE on the line: " + figures[0], *figures[1:]]
    lines.append(f"\nCoE calls {report['coe']['mean_experts_per_image']:.2f} models per image (router included).")
    if timed:  # the training times the zoo build recorded in the checkpoints (generating the images not included)
        experts = sum(e.get("train_seconds") or 0 for e in report["experts"])
        baselines = [f"{name} {report[key]['train_seconds']:.1f} s" for name, key in SYSTEMS[1:]
                     if report.get(key) and report[key].get("train_seconds") is not None]
        lines.append(f"Training (as recorded in the checkpoints): experts {experts:.1f} s"
                     + (f"; baselines: {', '.join(baselines)}" if baselines else "") + ".")
    return "\n".join(lines)
