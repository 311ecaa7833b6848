"""The README walk-through "Serve your own inspection data", made real: a factory's labeled images on disk, a spec
for a small CoE trained from them, and the user's commands run one after another with the real CLI.

  python bench/own_data_demo.py export DIR          write the dataset and the spec under DIR (nothing else)
  python bench/own_data_demo.py run DIR [--out F]   export, then run spec check, zoo build, zoo report, zoo
                                                    calibrate and serve (a station sending each of the line's new images once),
                                                    each command and its output written to F
                                                    (default docs/own-data-walkthrough.txt)

`make own-data-demo` is `run /tmp/expertmesh-own-data` (EXPERTMESH_HOME under it, so no shared zoo is touched).

The dataset is what an AOI line's export looks like: crops drawn by the project's generator
(`experts/pcb_aoi/generator.py`), renamed to the factory's own words and written as files:

  DIR/aoi_export/<category>/<label>/<board>-<ref>.png|.jpg    the labeled export (PNG and JPEG, some greyscale)
  DIR/aoi_export/manifest.csv                                 path,label,category of every file in it
  DIR/line_today/<category>/<label>/...                       new images from the line (another seed), never trained
                                                              on: what the station sends
  DIR/factory-coe.yaml                                        the spec: router + 3 experts + a fallback, all `data:`

Categories (the factory's part families) and the generator components drawn for them: passive (chip_resistor,
chip_capacitor), sot (sot23), polarized (diode, electrolytic_capacitor). Labels (the AOI's defect codes): ok,
missing, shifted (misaligned, 5x rarer than ok: the imbalanced class), bridge, no_solder, reversed (polarized only).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import yaml

from expertmesh.bench import walkthrough
from expertmesh.experts.pcb_aoi import generator

CATEGORIES = {"passive": ("chip_resistor", "chip_capacitor"), "sot": ("sot23",),
              "polarized": ("diode", "electrolytic_capacitor")}
LABELS = {"ok": "ok", "missing": "missing", "misaligned": "shifted", "solder_bridge": "bridge",
          "insufficient_solder": "no_solder", "reversed_polarity": "reversed"}  # generator defect -> factory label
PER_PAIR = {"ok": 40, "misaligned": 8}  # images per (component, defect) in the export; the others 20
LINE_PER_PAIR = {"ok": 8}  # in line_today; the others 2
SEED, LINE_SEED = 11, 12
ROOT = Path(__file__).resolve().parents[1]


def _write(img, path: Path, k: int) -> Path:
    """Every third file a JPEG, every fourth greyscale (a mono camera), the rest RGB PNG."""
    if k % 4 == 3:
        img = img.convert("L")
    if k % 3 == 2:
        path = path.with_suffix(".jpg")
        img.save(path, quality=92)
    else:
        img.save(path)
    return path


def export_images(root: Path, seed: int, per_pair: dict[str, int], default: int) -> list[tuple[str, str, str]]:
    """The folder tree `<root>/<category>/<label>/<board>-<ref>.<ext>`; returns (relative path, label, category)."""
    rows, k = [], 0
    for category, components in CATEGORIES.items():
        for comp in components:
            for defect in generator.defects_for(comp):
                label = LABELS[defect]
                folder = root / category / label
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_pair.get(defect, default)):
                    name = f"b{seed:02d}{i:03d}-{generator._DESIGNATORS[comp]}{k % 97 + 1}"
                    path = _write(generator.generate(comp, defect, seed, i), folder / f"{name}.png", k)
                    rows.append((path.relative_to(root).as_posix(), label, category))
                    k += 1
    return rows


def spec_data() -> dict:
    """The spec README.md shows: only what the factory knows (names, labels, data, training lengths); architecture,
    checkpoint, input_size_px and task take their defaults (`expertmesh spec check` prints them)."""
    defects = ["ok", "missing", "shifted", "bridge", "no_solder"]

    def expert(name, labels, data, **training):
        return {"name": name, "labels": labels, "pass_labels": ["ok"],
                "training": {"data": data, "epochs": 40, "batch_size": 32, "early_stopping_patience": 12,
                             "augment": ["rot90", "hflip", "vflip"], **training}}

    return {
        "name": "factory-coe", "version": 1,
        "description": "A factory's own AOI export: 3 part families, trained from labeled files",
        "seed": 0,
        "router": {"expert": "part_family", "min_confidence": 0.6, "fallback_expert": "general_aoi",
                   "expected_fallback_probability": 0.02},
        "experts": [
            {"name": "part_family", "labels": list(CATEGORIES),
             "training": {"data": {"folder": "aoi_export"}, "epochs": 20, "batch_size": 32,
                          "early_stopping_patience": 5, "augment": ["rot90", "hflip", "vflip"]}},
            expert("passive_aoi", defects, {"folder": "aoi_export/passive"}),
            expert("sot_aoi", defects, {"folder": "aoi_export/sot"}),
            expert("polarized_aoi", defects + ["reversed"],
                   {"manifest": "aoi_export/manifest.csv", "categories": ["polarized"]}),
            expert("general_aoi", ["ok", "defect"], {"manifest": "aoi_export/manifest.csv"},
                   label_map={k: "defect" for k in ["missing", "shifted", "bridge", "no_solder", "reversed"]}),
        ],
        "categories": [{"name": "passive", "experts": ["passive_aoi"], "probability": 0.5},
                       {"name": "sot", "experts": ["sot_aoi"], "probability": 0.2},
                       {"name": "polarized", "experts": ["polarized_aoi"], "probability": 0.3}],
    }


def export(root: Path) -> Path:
    """Write the dataset and the spec under `root`; returns the spec's path."""
    root.mkdir(parents=True, exist_ok=True)
    rows = export_images(root / "aoi_export", SEED, PER_PAIR, 20)
    with open(root / "aoi_export" / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "category"])
        w.writerows(rows)
    export_images(root / "line_today", LINE_SEED, LINE_PER_PAIR, 2)
    spec = root / "factory-coe.yaml"
    spec.write_text("# A small factory CoE trained from its own AOI export (bench/own_data_demo.py writes it).\n"
                    + yaml.safe_dump(spec_data(), sort_keys=False))
    return spec


def _tree_summary(root: Path) -> str:
    lines = []
    for top in ("aoi_export", "line_today"):
        files = [p for p in (root / top).rglob("*") if p.is_file() and p.suffix in (".png", ".jpg")]
        lines.append(f"{top}/: {len(files)} images ({sum(p.suffix == '.png' for p in files)} PNG, "
                     f"{sum(p.suffix == '.jpg' for p in files)} JPEG)")
        for cat in CATEGORIES:
            counts = {d.name: sum(1 for _ in d.iterdir()) for d in sorted((root / top / cat).iterdir())}
            lines.append(f"  {cat}/: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines)


def run(root: Path, out: Path) -> int:
    """Export, then the user's commands in order; each command line and its output go to `out` (and stdout)."""
    spec = export(root)
    zoo = root / "zoo"
    calibrated = root / "factory-coe.v2.yaml"
    steps = [
        ["expertmesh", "spec", "check", str(spec), "--zoo", str(zoo), "--skip-checkpoints"],
        ["expertmesh", "zoo", "build", "--spec", str(spec), "--zoo", str(zoo), "--no-progress"],
        ["expertmesh", "zoo", "report", "--spec", str(spec), "--zoo", str(zoo), "--no-progress"],
        ["expertmesh", "zoo", "calibrate", "--spec", str(spec), "--zoo", str(zoo), "--out", str(calibrated),
         "--no-progress"],
        ["expertmesh", "zoo", "report", "--spec", str(calibrated), "--zoo", str(zoo), "--no-progress"],
        ["expertmesh", "serve", "--spec", str(calibrated), "--zoo", str(zoo), "--no-profile", "--no-prometheus",
         "--station-each", "1", "--station-rate", "10", "--station-images", str(root / "line_today"),
         "--stop-after-station", "--grpc-port", "9310", "--http-port", "8310", "--metrics-port", "8390"],
    ]
    return walkthrough.record(root, out, target="own-data-demo", script="bench/own_data_demo.py",
                              summary=_tree_summary(root), steps=steps)


def main(argv: list[str] | None = None) -> int:
    return walkthrough.main(argv, doc=__doc__, export=export, summary=_tree_summary, run=run,
                            default_out=ROOT / "docs" / "own-data-walkthrough.txt")


if __name__ == "__main__":
    sys.exit(main())
