"""Which training choices help on real inspection images: the ELPV walk-through's CoE (`bench/real_data_demo.py`)
trained once per variant, each scored on the same held-out test split (carved from the data, seeded and
stratified; no variant trains, stops or calibrates on it).

  python -m expertmesh.bench.real_data_levers DIR [--variants a,b] [--merge] [--out bench/results/real_data]

Each variant changes the walk-through's spec in one place (input size, model width and depth, augmentation,
epochs) and trains every model of the CoE into its own zoo under DIR. Writes OUT.json and OUT.md: per variant the
CoE's verdict accuracy (PASS/DEFECT, the paper's functional/defective figure), its defect recall, its exact-grade
accuracy, each expert's own test accuracy, parameters and training seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from expertmesh.bench.provenance import provenance
from expertmesh.bench.real_data_demo import GRADES, PASS_GRADES, export, spec_data
from expertmesh.experts import file_baseline, file_eval
from expertmesh.experts.spec import parse_spec
from expertmesh.experts.zoo import build_zoo

WIDE = {"family": "resnet", "config": {"embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1],
                                       "layer_type": "basic"}}
#: The file-data defaults before this table chose new ones (rot90 + hflip, balanced classes): every variant names its
#: augmentation and class weighting, so the table means the same whatever the defaults become.
BEFORE = {"augment": ["rot90", "hflip"], "class_weighting": "balanced"}
#: ... and the input size before it: every model of a variant trains at 64 px unless the variant names another size
#: (files now default to 128 px), so each row means what it says.
BEFORE_SIZE_PX = 64
NO_AUGMENT = {**BEFORE, "augment": "none"}
FLIPS = {**BEFORE, "augment": ["hflip", "vflip"]}

#: name -> (what it changes, overrides of the graded experts; the router keeps the other defaults). Each variant adds one
#: lever to the one before it, except where it says otherwise.
VARIANTS: dict[str, tuple[str, dict]] = {
    "defaults": ("the defaults before this table: 64 px, the 79K-parameter ResNet, rot90 + hflip, balanced "
                 "classes, 40 epochs", {"training": BEFORE}),
    "no_augment": ("no augmentation", {"training": NO_AUGMENT}),
    "flips": ("flips only (hflip, vflip) instead of none", {"training": FLIPS}),
    "no_augment_100": ("no augmentation, 100 epochs", {"training": {**NO_AUGMENT, "epochs": 100}}),
    "no_augment_100_px96": ("no augmentation, 100 epochs, 96 px",
                            {"training": {**NO_AUGMENT, "epochs": 100}, "input_size_px": 96}),
    "no_augment_100_wide": ("no augmentation, 100 epochs, ResNet 32-64-128",
                            {"training": {**NO_AUGMENT, "epochs": 100}, "architecture": WIDE}),
    "no_augment_100_unweighted": ("no augmentation, 100 epochs, classes unweighted (class_weighting: none)",
                                  {"training": {**NO_AUGMENT, "epochs": 100, "class_weighting": "none"}}),
    "flips_100_unweighted": ("flips, 100 epochs, classes unweighted",
                             {"training": {**FLIPS, "epochs": 100, "class_weighting": "none"}}),
    "flips_100_unweighted_seed1": ("as flips_100_unweighted with spec seed 1 (other splits, initial weights and "
                                   "batch order): the noise between two runs of one recipe",
                                   {"training": {**FLIPS, "epochs": 100, "class_weighting": "none"}, "seed": 1}),
    "flips_100_unweighted_px128": ("flips, 100 epochs, classes unweighted, 128 px",
                                   {"training": {**FLIPS, "epochs": 100, "class_weighting": "none"},
                                    "input_size_px": 128}),
    "flips_100_unweighted_px96_wide": ("flips, 100 epochs, classes unweighted, 96 px, ResNet 32-64-128",
                                       {"training": {**FLIPS, "epochs": 100, "class_weighting": "none"},
                                        "input_size_px": 96, "architecture": WIDE}),
    "flips_100_unweighted_nostop": ("flips, 100 epochs, classes unweighted, no early stop (every epoch runs; the "
                                    "best validation epoch is kept)",
                                    {"training": {**FLIPS, "epochs": 100, "class_weighting": "none",
                                                  "early_stopping_patience": 1000}}),
    "flips_100_unweighted_nostop_px128": ("as flips_100_unweighted_nostop, 128 px",
                                          {"training": {**FLIPS, "epochs": 100, "class_weighting": "none",
                                                        "early_stopping_patience": 1000}, "input_size_px": 128}),
    "flips_100_unweighted_px128_verdict": ("as flips_100_unweighted_px128, the epoch kept chosen by validation "
                                           "verdict accuracy (training.select_epoch_by: verdict_accuracy)",
                                           {"training": {**FLIPS, "epochs": 100, "class_weighting": "none",
                                                         "select_epoch_by": "verdict_accuracy"},
                                            "input_size_px": 128}),
    "no_augment_100_shared": ("no augmentation, 100 epochs, both experts fine-tuned from a shared backbone: a "
                              "fallback expert trained on every cell (training.init_from)",
                              {"training": {**NO_AUGMENT, "epochs": 100}, "shared": True}),
}
SHARED = "all_cells"


def variant_spec(name: str) -> dict:
    data = spec_data()
    overrides = dict(VARIANTS[name][1])
    shared = overrides.pop("shared", False)
    data["seed"] = overrides.pop("seed", data["seed"])
    if shared:  # the fallback: every cell, every grade; the experts start from its weights
        data["experts"].append({"name": SHARED, "labels": list(dict.fromkeys(GRADES.values())),
                                "pass_labels": PASS_GRADES,
                                "training": {"data": {"manifest": "el_export/manifest.csv"}, "epochs": 40}})
        data["router"]["fallback_expert"] = SHARED
    for e in data["experts"]:
        e["input_size_px"] = BEFORE_SIZE_PX
    for e in data["experts"][1:]:
        for key, value in overrides.items():
            if key == "training":
                e["training"] = {**e["training"], **value}
            else:
                e[key] = copy.deepcopy(value)
        if shared and e["name"] != SHARED:
            e["training"] = {**e["training"], "init_from": SHARED}
    return data


def run_variant(root: Path, name: str, log=print, monolith: bool = False) -> dict:
    spec = parse_spec(variant_spec(name), base_dir=root)
    zoo = root / f"zoo-{name}"
    t0 = time.perf_counter()
    built = build_zoo(spec, zoo, progress=False, baselines=(), log=lambda m: log(f"  {m}"))
    train_s = sum(s.get("seconds", 0.0) for s in built.stats.values())
    if monolith:  # the matched-parameter monolith over every (type, grade), on the same splits
        file_baseline.build(spec, zoo, progress=False, log=lambda m: log(f"  {m}"))
    report = file_eval.evaluate(spec, zoo, progress=False, split="test")
    r = report.model_dump()
    return {"variant": name, "changes": VARIANTS[name][0], "commit": provenance()["commit"],
            "build_s": time.perf_counter() - t0,
            "train_s": train_s, "router_accuracy": r["router_accuracy"], "experts": r["experts"], "coe": r["coe"],
            "monolithic": r["monolithic"], "split": r["split"]}


def markdown(doc: dict) -> str:
    lines = ["# Training choices on real images (`python -m expertmesh.bench.real_data_levers`)", "",
             f"Measured {doc['date']} on {doc['machine']['cpu_count']} CPUs, commit {(doc['commit'] or '?')[:10]}. ELPV "
             "solar cells (2,624 real electroluminescence images, 2 types, 4 graded defect probabilities); each "
             "variant scored on the same test split (20% of each label, seeded by content; never trained, stopped "
             "or calibrated on). Verdict accuracy is PASS (ok, unlikely: p < 0.5) against DEFECT (likely, defective).", "",
             "| variant | changes | CoE verdict acc | defect recall | exact grade acc | mono_cells | poly_cells | "
             "router | params per expert | train s | monolith verdict acc | commit |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for v in doc["variants"]:
        acc = {e["expert"]: e for e in v["experts"]}
        lines.append(
            f"| {v['variant']} | {v['changes']} | {v['coe']['verdict_accuracy']:.3f} | {v['coe']['defect_recall']:.3f} "
            f"| {v['coe']['defect_accuracy']:.3f} | {acc['mono_cells']['accuracy']:.3f} | "
            f"{acc['poly_cells']['accuracy']:.3f} | {v['router_accuracy']:.3f} | "
            f"{acc['mono_cells']['num_parameters']:,} | {v['train_s']:.0f} | "
            + (f"{v['monolithic']['verdict_accuracy']:.3f} |" if v.get("monolithic") else "- |")
            + f" {(v.get('commit') or doc['commit'] or '?')[:7]} |")
    lines += ["", "Rows measured at another commit than the file's were kept from an earlier run (`--merge`): "
              "each variant names its augmentation, class weighting and epochs, so a later change of the defaults leaves "
              "its row as it was.",
              "", f"Test images: {doc['variants'][0]['coe']['num_images']} (the CoE's); the published CNN figure "
              "for functional against defective cells is 88.42% (Deitsch et al., Solar Energy 185, 2019, on their "
              "own 25% test split)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--out", type=Path, default=Path("bench/results/real_data"))
    p.add_argument("--merge", action="store_true", help="keep OUT.json's rows of the variants not run now (each row "
                                                          "names the commit it was measured at), in VARIANTS' order")
    p.add_argument("--monolith", default="no_augment_100", help="comma list of the variants whose matched-parameter "
                                                              "monolith is built and scored too")
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; use names from {list(VARIANTS)}")
    export(args.dir)
    doc = {"benchmark": "real_data", **provenance(), "variants": []}
    kept: dict[str, dict] = {}
    if args.merge and args.out.with_suffix(".json").exists():
        before = json.loads(args.out.with_suffix(".json").read_text())
        kept = {v["variant"]: {"commit": before["commit"], **v} for v in before["variants"]
                if v["variant"] in VARIANTS and v["variant"] not in names}
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: {VARIANTS[name][0]}", flush=True)
        v = run_variant(args.dir, name, monolith=name in args.monolith.split(","))
        done = {**kept, **{x["variant"]: x for x in doc["variants"]}, name: v}
        doc["variants"] = [done[n] for n in VARIANTS if n in done]
        print(f"  verdict accuracy {v['coe']['verdict_accuracy']:.3f}, defect recall {v['coe']['defect_recall']:.3f}, "
              f"exact grade {v['coe']['defect_accuracy']:.3f}, trained in {v['train_s']:.0f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
        args.out.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
