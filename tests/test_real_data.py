"""The real-data walk-through's export (bench/real_data_demo.py): the ELPV cells the elpv-dataset package ships, laid
out as a factory's folders with a manifest, every cell once under its type and grade; its spec and every lever
variant pass spec check. Training on them is `make real-data-demo` / `make real-data-levers` (minutes), not a test."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from expertmesh.bench.real_data_demo import GRADES, export, package_data, read_labels
from expertmesh.bench.real_data_levers import VARIANTS, markdown, variant_spec
from expertmesh.cli import main
from expertmesh.experts.spec import parse_spec

pytest.importorskip("elpv_dataset", reason="the elpv-dataset package (pip install -e '.[test]') ships the images")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return root, export(root)


def test_every_cell_once_under_its_type_and_grade(exported):
    root, _ = exported
    labels = read_labels(package_data())
    assert len(labels) == 2624
    files = [p for p in (root / "el_export").rglob("*.png")]
    assert len(files) == 2624 and len({p.name for p in files}) == 2624
    assert Counter((p.parent.parent.name, p.parent.name) for p in files) == Counter((k, g) for _, k, g in labels)
    assert {g for _, _, g in labels} == set(GRADES.values())
    with open(root / "el_export" / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2624 and all((root / "el_export" / r["path"]).is_file() for r in rows)
    assert all(r["path"].split("/")[:2] == [r["category"], r["label"]] for r in rows)


def test_the_spec_passes_spec_check_with_its_defaults_printed(exported, capsys):
    _, spec = exported
    assert main(["spec", "check", str(spec), "--skip-checkpoints"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("mono_cells") and "task" in x)
    assert "task classify" in line and "input_size_px" not in line  # the spec sets it: 128 px for 300 px cells


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_lever_variant_is_a_valid_spec(name, exported):
    root, _ = exported
    spec = parse_spec(variant_spec(name), base_dir=root)
    assert spec.expert("mono_cells").pass_labels == ["ok", "unlikely"]


def test_lever_table():
    row = {"variant": "defaults", "changes": "x", "train_s": 10.0, "router_accuracy": 1.0, "monolithic": None,
           "coe": {"verdict_accuracy": 0.8, "defect_recall": 0.7, "defect_accuracy": 0.6, "num_images": 525},
           "experts": [{"expert": n, "accuracy": 0.5, "num_parameters": 79_000} for n in ("mono_cells", "poly_cells")]}
    text = markdown({"date": "d", "machine": {"cpu_count": 2}, "commit": "abc", "variants": [row]})
    assert "| defaults | x | 0.800 | 0.700 | 0.600 | 0.500 | 0.500 | 1.000 | 79,000 | 10 | - | abc |" in text


def test_variants_train_at_the_size_they_name():
    """Every variant pins the input size it was measured at (64 px unless it names one), whatever the defaults."""
    sizes = {e["name"]: e["input_size_px"] for e in variant_spec("defaults")["experts"]}
    assert sizes == {"cell_type": 64, "mono_cells": 64, "poly_cells": 64}
    sizes = {e["name"]: e["input_size_px"] for e in variant_spec("flips_100_unweighted_px128")["experts"]}
    assert sizes == {"cell_type": 64, "mono_cells": 128, "poly_cells": 128}
