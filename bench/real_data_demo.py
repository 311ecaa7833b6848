"""The README walk-through "Serve your own inspection data" on real images nobody here generated: the ELPV dataset
(Buerhop-Lutz et al. 2018; Deitsch et al. 2019), 2,624 electroluminescence images of solar cells (300x300 px,
greyscale) from two product types (mono- and polycrystalline), each graded by experts with a defect probability of
0, 1/3, 2/3 or 1. It comes as a package (`pip install elpv-dataset`; licence CC BY-NC-SA 4.0, so it is used here
for measuring only and never copied into this repository).

  python bench/real_data_demo.py export DIR          the package's images as a factory's export, and the spec
  python bench/real_data_demo.py run DIR [--out F]   export, then the walk-through's commands (spec check, zoo build,
                                                     zoo report, zoo calibrate for a defect recall of 0.95, zoo
                                                     report of the calibrated spec), each with its output written to F
                                                     (default docs/real-data-walkthrough.txt)

`make real-data-demo` runs `run /tmp/expertmesh-real-data` (EXPERTMESH_HOME under it: no shared zoo is touched).

The export is laid out as an inspection line would write it, and as the walk-through expects:

  DIR/el_export/<type>/<grade>/cellNNNN.png     type: mono, poly (the router's categories); grade: the graders'
                                                defect probability: ok (0), unlikely (1/3), likely (2/3),
                                                defective (1)
  DIR/el_export/manifest.csv                    path,label,category of every cell (label: its grade)

The paper's CNN figure (88.42% average accuracy) is for telling functional cells (p < 0.5) from defective ones
(p >= 0.5); the CoE's matching figure is its PASS/DEFECT verdict accuracy with `pass_labels: [ok, unlikely]`.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import yaml

from expertmesh.bench import walkthrough
ROOT = Path(__file__).resolve().parents[1]
#: the package's defect probability -> the grade folder; the paper counts a cell defective from p = 0.5 up
GRADES = {0.0: "ok", 1 / 3: "unlikely", 2 / 3: "likely", 1.0: "defective"}
PASS_GRADES = ["ok", "unlikely"]
#: The cells are 300 px and their cracks thin: 128 px gave 2.6 points of verdict accuracy over the default 64 px
#: (bench/results/real_data.md); what a user who knows their images sets (README: input_size_px).
INPUT_SIZE_PX = 128
TYPES = ("mono", "poly")


def package_data() -> Path:
    """The elpv-dataset package's data folder (labels.csv and images/), or a clear error naming the fix."""
    try:
        import elpv_dataset
    except ImportError:
        raise SystemExit("error: the ELPV images come from the elpv-dataset package, which is not installed; fix: "
                         "`make real-data-demo` installs it, or `.venv/bin/pip install elpv-dataset==1.0.0.post1`")
    return Path(elpv_dataset.__file__).parent / "data"


def grade_of(probability: float) -> str:
    return GRADES[min(GRADES, key=lambda p: abs(p - probability))]


def read_labels(data: Path) -> list[tuple[str, str, str]]:
    """(relative image path, type, grade) of every cell in the package's labels.csv."""
    rows = []
    for line in (data / "labels.csv").read_text().splitlines():
        if line.strip():
            path, probability, kind = line.split()
            rows.append((path, kind, grade_of(float(probability))))
    return rows


def spec_data() -> dict:
    """The walk-through's spec for these cells, in the README's form: names, labels, data; everything else default."""
    def expert(kind: str) -> dict:
        return {"name": f"{kind}_cells", "labels": list(dict.fromkeys(GRADES.values())), "pass_labels": PASS_GRADES,
                "input_size_px": INPUT_SIZE_PX, "training": {"data": {"folder": f"el_export/{kind}"}, "epochs": 100}}

    return {"name": "solar-cells", "seed": 0,
            "description": "ELPV electroluminescence cells: two product types, four defect grades",
            "router": {"expert": "cell_type"},
            "experts": [{"name": "cell_type", "labels": list(TYPES), "input_size_px": INPUT_SIZE_PX,
                         "training": {"data": {"folder": "el_export"}, "epochs": 20}},
                        expert("mono"), expert("poly")],
            "categories": [{"name": "mono", "experts": ["mono_cells"], "probability": 0.4},
                           {"name": "poly", "experts": ["poly_cells"], "probability": 0.6}]}


def export(root: Path) -> Path:
    """Copy the package's cells into `root/el_export/<type>/<grade>/` and write the spec; returns the spec's path."""
    data = package_data()
    rows = []
    for path, kind, grade in read_labels(data):
        folder = root / "el_export" / kind / grade
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / Path(path).name
        if not target.exists():
            shutil.copyfile(data / path, target)
        rows.append((target.relative_to(root / "el_export").as_posix(), grade, kind))
    with open(root / "el_export" / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "category"), *rows])
    spec = root / "solar-cells.yaml"
    spec.write_text("# ELPV solar cells as a factory's export (bench/real_data_demo.py writes it).\n"
                    + yaml.safe_dump(spec_data(), sort_keys=False))
    return spec


def tree_summary(root: Path) -> str:
    lines = []
    for kind in TYPES:
        counts = {d.name: sum(1 for _ in d.iterdir()) for d in sorted((root / "el_export" / kind).iterdir())}
        lines.append(f"el_export/{kind}/: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines)


def run(root: Path, out: Path) -> int:
    """Export, then the user's commands in order; each command line and its output go to `out` (and stdout)."""
    spec = export(root)
    zoo = root / "zoo"
    calibrated = root / "solar-cells.v2.yaml"
    steps = [
        ["expertmesh", "spec", "check", str(spec), "--zoo", str(zoo), "--skip-checkpoints"],
        ["expertmesh", "zoo", "build", "--spec", str(spec), "--zoo", str(zoo), "--no-progress"],
        ["expertmesh", "zoo", "report", "--spec", str(spec), "--zoo", str(zoo), "--no-progress"],
        ["expertmesh", "zoo", "calibrate", "--spec", str(spec), "--zoo", str(zoo), "--target-defect-recall", "0.95",
         "--out", str(calibrated), "--no-progress"],
        ["expertmesh", "zoo", "report", "--spec", str(calibrated), "--zoo", str(zoo), "--no-progress"],
    ]
    return walkthrough.record(root, out, target="real-data-demo", script="bench/real_data_demo.py",
                              summary=tree_summary(root), steps=steps, timed=True)


def main(argv: list[str] | None = None) -> int:
    return walkthrough.main(argv, doc=__doc__, export=export, summary=tree_summary, run=run,
                            default_out=ROOT / "docs" / "real-data-walkthrough.txt")


if __name__ == "__main__":
    sys.exit(main())
