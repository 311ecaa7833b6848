"""A CoE trained on its own files: consistent splits across models, the held-out set the report and calibration
measure on, candidates by label, the station sending files, and `zoo report` / `zoo calibrate` on such a zoo.
No Ray."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from expertmesh.cli import main
from expertmesh.errors import InvalidArgument
from expertmesh.experts import file_baseline, file_eval
from expertmesh.experts import labeled_data as ld
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.spec import load_spec, parse_spec
from expertmesh.profiler.run import measure_usage
from expertmesh.station import load_images

TINY = {"family": "resnet", "config": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}}
FACTORY = {"passive": ("chip_resistor", {"ok": 10, "missing": 6, "shifted": 3}),
           "polar": ("diode", {"ok": 10, "missing": 6, "reversed": 6})}
DEFECT = {"ok": "ok", "missing": "missing", "shifted": "misaligned", "reversed": "reversed_polarity"}


def test_splits_by_content_agree_across_models():
    """Two models labelling the same images differently (a router by category, an expert by defect) hold out
    nearly the same images; the old per-label permutation shares about fraction^2 of them."""
    hashes = [f"h{i}" for i in range(200)]
    cats = ["a" if i < 100 else "b" for i in range(200)]
    defects = [str(i % 4) for i in range(200)]
    none = [None] * 200
    router = ld.assign_splits(cats, hashes, none, 0.2, 0, by_content=True)
    expert = ld.assign_splits(defects, hashes, none, 0.2, 0, by_content=True)
    val_r = {h for h, s in zip(hashes, router) if s == "validation"}
    val_e = {h for h, s in zip(hashes, expert) if s == "validation"}
    assert len(val_r) == len(val_e) == 40 and len(val_r & val_e) >= 30
    assert router == ld.assign_splits(cats, hashes, none, 0.2, 0, by_content=True)  # seeded
    assert router != ld.assign_splits(cats, hashes, none, 0.2, 1, by_content=True)
    # stratified: each label keeps its share; given splits stay
    assert sum(s == "validation" and c == "a" for s, c in zip(router, cats)) == 20
    given = ["test"] + [None] * 199
    assert ld.assign_splits(cats, hashes, given, 0.2, 0, by_content=True)[0] == "test"


def _rec(label, category=None):
    return ld.Record(Path(f"/x/{label}"), label, label, category=category)


def _split(items):
    """items: (hash, label, split, category or None) -> SplitData with 8x8 images."""
    recs = [_rec(lab, cat) for _, lab, _, cat in items]
    return ld.SplitData(recs, np.zeros((len(items), 8, 8, 3), np.uint8), [h for h, *_ in items],
                        [s for _, _, s, _ in items])


def _spec(shared: bool = False):
    """shared: passive_x serves both categories (and there is no polar_x)."""
    e = lambda name, labels, **t: {"name": name, "task": "classify", "architecture": TINY, "checkpoint": name,  # noqa: E731
                                   "input_size_px": 16, "labels": labels, "pass_labels": ["ok"],
                                   "training": {"data": {"folder": name}, **t}}
    return parse_spec({
        "name": "f", "router": {"expert": "r", "fallback_expert": "general"},
        "experts": [{"name": "r", "task": "route", "architecture": TINY, "checkpoint": "r", "input_size_px": 16,
                     "labels": ["passive", "polar"], "training": {"data": {"folder": "r"}}},
                    e("passive_x", ["ok", "missing", "shifted"]),
                    *([] if shared else [e("polar_x", ["ok", "missing", "reversed"])]),
                    e("general", ["ok", "defect"], label_map={"missing": "defect", "shifted": "defect",
                                                              "reversed": "defect"})],
        "categories": [{"name": "passive", "experts": ["passive_x"], "probability": 0.5},
                       {"name": "polar", "experts": ["passive_x" if shared else "polar_x"],
                        "probability": 0.5}]})


def test_held_out_set_excludes_what_any_model_trained_on_and_finds_categories():
    spec = _spec(shared=True)  # passive_x serves both categories: its images' categories come from the manifest or the router
    splits = {
        "r": _split([("a", "passive", "validation", None), ("b", "passive", "validation", None),
                     ("c", "polar", "train", None), ("d", "polar", "validation", None)]),
        "passive_x": _split([("a", "ok", "validation", None), ("b", "missing", "validation", None),
                             ("c", "missing", "validation", None),  # the router trained on c: not held out
                             ("d", "ok", "validation", None), ("e", "shifted", "validation", "polar"),
                             ("f", "ok", "validation", None),  # no category anywhere: unplaced
                             ("g", "ok", "train", None)]),
    }
    held = file_eval.held_out(spec, splits, "validation")
    assert held.categories == ["passive", "passive", "polar", "polar"]
    assert held.labels == ["ok", "missing", "ok", "shifted"] and held.is_defect == [False, True, False, True]
    assert held.num_unplaced == 1 and held.images.shape == (4, 16, 16, 3)  # at the largest input size
    assert list(held.per_expert["passive_x"].y) == [0, 1, 1, 0, 2, 0]  # its own validation split, whole
    # an expert serving one category places its images there without any manifest column; images only a
    # fallback's data holds count too (placed by the router's label), so the set does not depend on the table
    one = _spec()
    held = file_eval.held_out(one, {"r": _split([("z", "polar", "validation", None)]),
                                    "passive_x": _split([("a", "ok", "validation", None)]),
                                    "general": _split([("a", "ok", "validation", None),
                                                       ("z", "defect", "validation", None)])}, "validation")
    assert held.categories == ["passive", "polar"] and held.is_defect == [False, True]


def test_candidates_are_the_experts_knowing_every_label_of_a_category():
    spec = _spec()
    held = file_eval.HeldOut("validation", np.zeros((3, 16, 16, 3), np.uint8), ["passive", "polar", "polar"],
                             ["defect", "ok", "reversed"], ["shifted", "ok", "reversed"], [True, False, True])
    opts = file_eval.candidate_options(spec, held)  # by the raw labels (general's "defect" was "shifted")
    assert opts["passive"] == [("passive_x",), ("general",)]  # polar_x does not know "shifted"
    assert opts["polar"] == [("polar_x",), ("general",)]


def test_station_sends_your_files_with_truth_from_their_folders(tmp_path):
    for label, n in (("ok", 3), ("bridge", 2)):
        (tmp_path / "cat" / label).mkdir(parents=True)
        for i in range(n):
            generator.generate("sot23", "ok", 0, i).save(tmp_path / "cat" / label / f"{i}.{'jpg' if i else 'png'}")
    (tmp_path / "README.txt").write_text("not an image")
    pool = load_images(tmp_path, {"ok"})
    assert len(pool) == 5 and {p.component for p in pool} == {"cat"}
    assert sorted(p.defect for p in pool) == ["bridge", "bridge", "ok", "ok", "ok"]
    assert {p.image[:4] for p in pool} == {b"\x89PNG", b"\xff\xd8\xff\xe0"}  # sent as they are
    assert {(p.file.split("/")[1], p.label) for p in pool} == {("ok", "ok"), ("bridge", "bridge")}
    with pytest.raises(InvalidArgument, match="no PNG or JPEG") as err:
        load_images(tmp_path / "cat" / "missing-folder", {"ok"})
    assert err.value.field == "--images"
    # the same files from a manifest (paths relative to it), and a row that names no file
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{p.file},{p.label}\n" for p in pool))
    again = load_images(tmp_path / "m.csv", {"ok"})
    assert sorted((p.file, p.defect, p.image) for p in again) == sorted((p.file, p.defect, p.image) for p in pool)
    (tmp_path / "bad.csv").write_text("path,label\ncat/ok/none.png,ok\n")
    with pytest.raises(InvalidArgument, match="no file cat/ok/none.png"):
        load_images(tmp_path / "bad.csv", {"ok"})


@pytest.fixture(scope="module")
def factory(tmp_path_factory) -> Path:
    """A tiny factory export: <root>/data/<category>/<label>/*, a manifest, a spec trained from them (2 epochs)."""
    root = tmp_path_factory.mktemp("factory")
    rows = []
    for cat, (comp, counts) in FACTORY.items():
        for label, n in counts.items():
            (root / "data" / cat / label).mkdir(parents=True)
            for i in range(n):
                img = generator.generate(comp, DEFECT[label], 3, i)
                rel = f"{cat}/{label}/{i}.{'jpg' if i % 3 == 2 else 'png'}"
                (img.convert("L") if i % 4 == 3 else img).save(root / "data" / rel)
                rows.append((rel, label, cat))
    with open(root / "data" / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "category"), *rows])
    e = lambda name, labels, data, **t: {  # noqa: E731
        "name": name, "task": "classify", "architecture": TINY, "checkpoint": name, "input_size_px": 32,
        "labels": labels, "pass_labels": ["ok"], "training": {"data": data, "epochs": 2, "batch_size": 8, **t}}
    spec = {"name": "factory", "seed": 0, "router": {"expert": "family", "min_confidence": 0.5, "fallback_expert": "general"},
            "experts": [{"name": "family", "task": "route", "architecture": TINY, "checkpoint": "family",
                         "input_size_px": 32, "labels": list(FACTORY),
                         "training": {"data": {"folder": "data"}, "epochs": 2, "batch_size": 8}},
                        e("passive_x", ["ok", "missing", "shifted"], {"folder": "data/passive"}),
                        e("polar_x", ["ok", "missing", "reversed"],
                          {"manifest": "data/manifest.csv", "categories": ["polar"]}),
                        e("general", ["ok", "defect"], {"manifest": "data/manifest.csv"},
                          label_map={"missing": "defect", "shifted": "defect", "reversed": "defect"})],
            "categories": [{"name": "passive", "experts": ["passive_x"], "probability": 0.6},
                           {"name": "polar", "experts": ["polar_x"], "probability": 0.4}]}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["zoo", "build", "--spec", str(root / "spec.yaml"), "--zoo", str(root / "zoo"), "--no-progress"]) == 0
    return root


def test_report_and_calibrate_measure_on_the_files(factory, capsys):
    spec_file, zoo = factory / "spec.yaml", factory / "zoo"
    capsys.readouterr()
    assert main(["zoo", "report", "--spec", str(spec_file), "--zoo", str(zoo), "--no-progress",
                 "--json", str(factory / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "trained on files; each model on its own test split" in out and "passive_x" in out
    assert "no model trained on or stopped on" in out  # the carved test split, not the one that chose the epochs
    r = json.loads((factory / "report.json").read_text())
    assert r["split"] == "test" and 0 < r["coe"]["num_images"] < 60
    mono = r["monolithic"]  # the files' monolith, on the same test images
    assert mono is not None and mono["num_images"] == r["coe"]["num_images"] and "mono (active)" in out
    assert 0.5 < mono["active_parameters_per_image"] / r["coe"]["active_parameters_per_image"] < 2
    assert {e["expert"] for e in r["experts"]} == {"family", "passive_x", "polar_x", "general"}
    assert all(e["train_seconds"] > 0 for e in r["experts"]) and 0 <= r["coe"]["defect_recall"] <= 1

    new = factory / "spec.v2.yaml"
    assert main(["zoo", "calibrate", "--spec", str(spec_file), "--zoo", str(zoo), "--no-progress",
                 "--target-wrong-route", "0.9", "--out", str(new), "--json", str(factory / "cal.json")]) == 0
    out = capsys.readouterr().out
    assert "validation images of its files that no model trained on" in out
    cal = json.loads((factory / "cal.json").read_text())
    assert cal["source"] == "files" and cal["num_images"] > 0  # the validation images, not the report's test ones
    test_hashes = held_out_hashes(factory, "test")
    assert test_hashes and not test_hashes & held_out_hashes(factory, "validation")
    assert set(cal["scores"]["passive"]) == {"passive_x", "general"}  # polar_x does not know "shifted"
    spec = load_spec(spec_file)
    held = file_eval.held_out(spec, file_eval.read_splits(spec, progress=False), "validation")
    polar_labels = {lab for lab, cat in zip(held.raw_labels, held.categories) if cat == "polar"}
    # passive_x may judge polar parts only when none of their validation images is one it never learnt (reversed)
    assert set(cal["scores"]["polar"]) == {"polar_x", "general"} | (
        {"passive_x"} if file_eval.judges(spec.expert("passive_x"), polar_labels) else set())
    calibrated = load_spec(new, zoo_root=zoo)  # its data paths still resolve (written beside the spec)
    assert calibrated.version == 2 and calibrated.router.min_confidence == cal["threshold"]["min_confidence"]


def test_the_files_monolith_never_trains_on_the_test_images(factory):
    """Its classes are every (category, label) of the table experts; its train and validation images are theirs,
    each under its category; none is a test image of the CoE."""
    spec = load_spec(factory / "spec.yaml")
    mono = file_baseline.monolith_spec(spec)
    assert mono.labels == ["passive/ok", "passive/missing", "passive/shifted", "polar/ok", "polar/missing",
                           "polar/reversed"] and mono.pass_labels == ["passive/ok", "polar/ok"]
    x, y, x_val, y_val, counts = file_baseline.training_arrays(spec, mono, file_eval.read_splits(spec, progress=False))
    seen = {hashlib.sha256(img.tobytes()).hexdigest() for img in np.concatenate([x, x_val])}
    assert len(y) and len(y_val) and not seen & held_out_hashes(factory, "test")
    assert file_baseline.is_current(spec, factory / "zoo")
    assert sum(counts["train"].values()) == len(y) and set(counts["train"]) <= set(mono.labels)


def held_out_hashes(factory, split: str) -> set[str]:
    """The content of the CoE's held-out images of `split`."""
    spec = load_spec(factory / "spec.yaml")
    held = file_eval.held_out(spec, file_eval.read_splits(spec, progress=False), split)
    return {hashlib.sha256(img.tobytes()).hexdigest() for img in held.images}


def test_usage_sample_of_a_file_coe_runs_on_its_files(factory):
    """`expertmesh profile --usage sample` counts a file-data CoE's calls on its own held-out images."""
    spec = load_spec(factory / "spec.yaml")
    u = measure_usage(spec, factory / "zoo", "sample")
    assert u.source == "sample" and u.num_requests > 0 and u.usage["family"] == 1.0
    assert u.usage["passive_x"] + u.usage["polar_x"] + u.usage["general"] == pytest.approx(1.0)


def test_calibrate_chooses_operating_points_for_a_target_recall(factory, capsys):
    """`zoo calibrate --target-defect-recall`: each judging expert's least pass_min_probability that finds that
    share of its categories' defective validation images; the written spec carries it and its report runs at it."""
    spec_file, zoo = factory / "spec.yaml", factory / "zoo"
    new = factory / "spec.recall.yaml"
    capsys.readouterr()
    assert main(["zoo", "calibrate", "--spec", str(spec_file), "--zoo", str(zoo), "--no-progress",
                 "--target-wrong-route", "0.9", "--target-defect-recall", "0.9", "--out", str(new),
                 "--json", str(factory / "recall.json")]) == 0
    out = capsys.readouterr().out
    assert "operating points for a defect recall of 0.9000" in out and "CoE defect recall" in out
    cal = json.loads((factory / "recall.json").read_text())
    points = cal["operating_points"]
    assert points and all(p["reached"] and p["defect_recall"] >= 0.9 for p in points)
    calibrated = load_spec(new, zoo_root=zoo)
    assert all(calibrated.expert(p["expert"]).pass_min_probability == p["chosen"] for p in points)
    assert main(["zoo", "report", "--spec", str(new), "--zoo", str(zoo), "--no-progress",
                 "--json", str(factory / "recall-report.json")]) == 0
    out = capsys.readouterr().out
    assert "escape rate (defects passed)" in out and "truth \\ verdict" in out
    coe = json.loads((factory / "recall-report.json").read_text())["coe"]
    assert sum(sum(row.values()) for row in coe["confusion"].values()) == coe["num_images"]

    assert main(["zoo", "calibrate", "--spec", str(spec_file), "--zoo", str(zoo), "--no-progress",
                 "--target-defect-recall", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--target-defect-recall" in err and "fix:" in err
