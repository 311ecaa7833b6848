"""Training from labeled image files: folder and manifests, seeded splits, the bad-data report, zoo builds."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from expertmesh.errors import SpecError
from expertmesh.experts import labeled_data as ld
from expertmesh.experts.images import decode_image
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.spec import ExpertSpec, ImageLimits, load_spec, parse_spec
from expertmesh.experts.zoo import META_FILE, RECIPE_VERSION, build_zoo, fingerprint, is_current, monolithic_spec

from conftest import default_spec_data, tiny_spec_data

quiet = dict(progress=False, log=lambda *_: None)
LABELS = ["ok", "missing", "misaligned"]
COUNTS = {"ok": 12, "missing": 12, "misaligned": 4}  # misaligned: 3x fewer
CATEGORIES = ["chip_resistor", "sot23"]
TINY = {"family": "resnet", "config": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}}


def _encode(img, i: int) -> tuple[str, bytes]:
    """Every 2nd image greyscale, every 3rd JPEG: PNG and JPEG, greyscale and RGB, all in one set."""
    img = img.convert("L") if i % 2 else img
    fmt, ext = ("JPEG", "jpg") if i % 3 == 0 else ("PNG", "png")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return ext, buf.getvalue()


def write_folder(root: Path, per_label: dict[str, int], component="chip_resistor", by_component=False) -> list[tuple[str, str]]:
    """Generated images as <root>/<label>/<n>.<png|jpg>; returns (relative path, label) rows."""
    rows = []
    for label, n in per_label.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = generator.generate(label, "ok", 7, i) if by_component else generator.generate(component, label, 7, i)
            ext, data = _encode(img, i)
            (root / label / f"{i:03d}.{ext}").write_bytes(data)
            rows.append((f"{label}/{i:03d}.{ext}", label))
    return rows


def write_manifests(root: Path, rows, splits=None) -> tuple[Path, Path]:
    csv_path, jsonl_path = root / "manifest.csv", root / "manifest.jsonl"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "category", "split", "weight"])
        for j, (rel, label) in enumerate(rows):
            w.writerow([rel, label, "chip_resistor", (splits or {}).get(rel, ""), ""])
    jsonl_path.write_text("".join(json.dumps({"path": rel, "label": label, "category": "chip_resistor",
                                              **({"split": splits[rel]} if splits else {})}) + "\n" for rel, label in rows))
    return csv_path, jsonl_path


def spec_data(expert_data: dict, router_data: dict | None = None, **training) -> dict:
    router_training = {"data": router_data} if router_data else {"target": "component", "num_train_per_label": 4}
    return {
        "name": "files", "seed": 0,
        "router": {"expert": "router", "min_confidence": 0.5},
        "experts": [
            {"name": "router", "task": "route", "architecture": TINY, "checkpoint": "router", "input_size_px": 32,
             "labels": CATEGORIES, "training": {"epochs": 2, "batch_size": 8, **router_training}},
            {"name": "chip", "task": "classify", "architecture": TINY, "checkpoint": "chip", "input_size_px": 32,
             "labels": LABELS, "pass_labels": ["ok"],
             "training": {"data": expert_data, "epochs": 3, "batch_size": 8, **training}},
        ],
        "categories": [{"name": "chip_resistor", "experts": ["chip"], "probability": 0.5},
                       {"name": "sot23", "experts": ["chip"], "probability": 0.5}],
    }


def write_spec(path: Path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return load_spec(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rows = write_folder(root / "images", COUNTS)
    write_manifests(root / "images", rows)
    write_folder(root / "categories", {c: 6 for c in CATEGORIES}, by_component=True)
    return root


def test_folder_and_both_manifests_list_the_same_images(dataset):
    folder = ld.list_folder(dataset / "images", LABELS, {})
    csv_l = ld.read_manifest(dataset / "images" / "manifest.csv", LABELS, {})
    jsonl = ld.read_manifest(dataset / "images" / "manifest.jsonl", LABELS, {})
    assert folder.problems == csv_l.problems == jsonl.problems == []
    as_set = lambda listing: {(r.rel, r.label, r.split) for r in listing.records}  # noqa: E731
    assert as_set(folder) == as_set(csv_l) == as_set(jsonl) and len(folder.records) == sum(COUNTS.values())
    # the router reads a manifest's category column; rows of other categories can be filtered out
    routed = ld.read_manifest(dataset / "images" / "manifest.csv", CATEGORIES, {}, "category")
    assert {r.label for r in routed.records} == {"chip_resistor"}
    assert ld.read_manifest(dataset / "images" / "manifest.csv", LABELS, {}, categories=["sot23"]).problems


def test_greyscale_and_jpeg_decode_as_the_ingress_does(dataset):
    recs = ld.list_folder(dataset / "images", LABELS, {}).records
    grey = next(r for r in recs if r.rel.endswith("001.png"))
    images, hashes, problems = ld.read_images([grey], ImageLimits(), 32, progress=False)
    assert problems == [] and hashes[0] == hashlib.sha256(grey.path.read_bytes()).hexdigest()
    expected = np.asarray(decode_image(grey.path.read_bytes(), ImageLimits()).resize((32, 32), Image.BILINEAR))
    assert np.array_equal(images[0], expected) and np.array_equal(images[0][..., 0], images[0][..., 2])


def test_split_is_seeded_and_stratified():
    labels = ["a"] * 20 + ["b"] * 5
    hashes = [f"h{i}" for i in range(25)]
    hashes[1] = "h0"  # two identical "a" files: always on the same side
    one = ld.assign_splits(labels, hashes, [None] * 25, 0.2, seed=1)
    assert one == ld.assign_splits(labels, hashes, [None] * 25, 0.2, seed=1)
    assert one != ld.assign_splits(labels, hashes, [None] * 25, 0.2, seed=2)
    assert [one[i] for i in range(20)].count("validation") in (4, 5)  # 19 distinct "a" images: round(3.8) = 4 groups
    assert [one[i] for i in range(20, 25)].count("validation") == 1  # the small class still gets one
    assert one[0] == one[1]
    given = ld.assign_splits(labels, hashes, ["test"] + [None] * 24, 0.2, seed=1)
    assert given[0] == "test" and ld.assign_splits(["a", "a"], ["x", "y"], [None, None], 0.0, 0) == ["train", "train"]


@pytest.mark.parametrize("seed", range(5))
def test_test_split_is_carved_stratified_and_never_overlaps(seed):
    """Test first, then validation, by content: the sides never share an image, every label keeps a training image,
    and without a test fraction the split is exactly what it was before test was carved."""
    rng = np.random.default_rng(seed)
    labels = [str(x) for x in rng.choice(["ok", "crack", "finger"], p=[0.7, 0.2, 0.1], size=200)] + ["rare"] * 2
    hashes = [f"h{rng.integers(0, 150)}" for _ in range(202)]  # duplicates across the set, some across labels
    splits = ld.assign_splits(labels, hashes, [None] * 202, 0.2, seed=seed, by_content=True, test_fraction=0.2)
    assert ld.assign_splits(labels, hashes, [None] * 202, 0.2, seed=seed, by_content=True, test_fraction=0.0) == \
        ld.assign_splits(labels, hashes, [None] * 202, 0.2, seed=seed, by_content=True)
    for label in set(labels):
        sides = {}
        for lab, h, s in zip(labels, hashes, splits):
            if lab == label:
                sides.setdefault(h, set()).add(s)
        assert all(len(v) == 1 for v in sides.values())  # one content, one side
        counts = {s: sum(1 for v in sides.values() if s in v) for s in ("train", "validation", "test")}
        assert counts["train"] >= 1
        if len(sides) >= 5:  # stratified: about a fifth of each label's distinct images on each held-out side
            for held in ("validation", "test"):
                assert abs(counts[held] - 0.2 * len(sides)) <= 1, (label, counts)
    rare = [s for lab, s in zip(labels, splits) if lab == "rare"]
    assert sorted(rare) == ["test", "train"]  # two images: one tested, one trained, none left for validation


def test_manifest_split_is_honoured(dataset, tmp_path):
    rows = [(str(r.path), r.label) for r in ld.list_folder(dataset / "images", LABELS, {}).records]
    splits = {rel: ("validation" if i % 4 == 0 else "train") for i, (rel, _) in enumerate(rows)}
    n_val = sum(1 for s in splits.values() if s == "validation")
    for path in write_manifests(tmp_path, rows, splits):
        spec = write_spec(tmp_path / "spec.yaml", spec_data({"manifest": path.name}))
        data, problems = ld.prepare(spec, spec.expert("chip"), validation_fraction=0.2, progress=False)
        assert problems == [] and len(data.y_val) == sum(data.counts["validation"].values()) == n_val
        assert len(data.y_train) == len(rows) - n_val


def test_bad_data_is_reported_all_at_once_before_training(dataset, tmp_path):
    bad = tmp_path / "bad"
    write_folder(bad, {"ok": 3})  # "scratch" is no label; "missing", "misaligned" have no images
    (bad / "scratch").mkdir()
    (bad / "scratch" / "x.png").write_bytes((bad / "ok" / "001.png").read_bytes())
    (bad / "ok" / "notes.png").write_text("not an image")
    (bad / "empty").mkdir()
    (tmp_path / "m").mkdir()
    src = dataset / "images" / "ok" / "000.jpg"
    (tmp_path / "m" / "a.jpg").write_bytes(src.read_bytes())
    (tmp_path / "m" / "b.jpg").write_bytes(src.read_bytes())
    (tmp_path / "m" / "manifest.csv").write_text(
        "path,label,split,weight\na.jpg,ok,train,\nb.jpg,ok,val,\ngone.png,ok,,\n,missing,,\n"
        "a.jpg,misaligned,holdout,\na.jpg,ok,train,-1\n")
    data = spec_data({"folder": "bad"}, router_data={"manifest": "m/manifest.csv", "label_field": "label"})
    data["experts"][0]["labels"] = data["experts"][1]["labels"]  # the router here reads the expert labels
    data["categories"] = [{"name": n, "experts": ["chip"], "probability": 1 / 3} for n in LABELS]
    spec = write_spec(tmp_path / "spec.yaml", data)
    with pytest.raises(ld.DataError) as info:
        build_zoo(spec, tmp_path / "zoo", **quiet)
    text = str(info.value)
    found = [(p.file, p.message, p.fix) for p in info.value.problems]
    assert all(fix for _, _, fix in found) and not (tmp_path / "zoo").exists()
    expect = [("notes.png", "ingress would refuse"), ("scratch", "not one of the expert's labels"),
              ("bad", "'missing' has no images"), ("bad", "'misaligned' has no images"),
              ("manifest.csv:4 (gone.png)", "no file"), ("manifest.csv:5", "no path"),
              ("manifest.csv:6 (a.jpg)", "split 'holdout'"), ("manifest.csv:7 (a.jpg)", "weight '-1'"),
              ("a.jpg", "train split here and the validation split")]
    for file, message in expect:
        assert any(file in f and message in m for f, m, _ in found), (file, message, text)
    empty = write_spec(tmp_path / "spec2.yaml", spec_data({"folder": "bad/empty"}))
    with pytest.raises(ld.DataError, match="holds no images"):
        build_zoo(empty, tmp_path / "zoo", only=["chip"], **quiet)


def test_train_from_folders_end_to_end(dataset, tmp_path):
    data = spec_data({"folder": str(dataset / "images")}, router_data={"folder": str(dataset / "categories")},
                     augment=["rot90", "hflip", "brightness"])
    spec = write_spec(tmp_path / "spec.yaml", data)
    res = build_zoo(spec, tmp_path / "zoo", **quiet)
    assert sorted(res.trained) == ["chip", "router"]  # no monolithic baseline: nothing trains on generated images
    for name in ("chip", "router"):
        meta = json.loads((tmp_path / "zoo" / name / META_FILE).read_text())
        assert 0 <= meta["train"]["validation_accuracy"] <= 1 and 1 <= meta["train"]["best_epoch"] <= 3
        assert meta["train"]["num_validation"] > 0
    router = json.loads((tmp_path / "zoo" / "router" / META_FILE).read_text())["data"]["images"]
    num_test = sum(router["test"].values())
    assert num_test > 0 and meta["train"]["num_images"] + meta["train"]["num_validation"] + num_test == 12
    chip = json.loads((tmp_path / "zoo" / "chip" / META_FILE).read_text())["data"]["images"]
    assert sum(chip[s]["misaligned"] for s in ("train", "validation", "test")) == 4
    assert chip["validation"]["misaligned"] == chip["test"]["misaligned"] == 1
    assert build_zoo(spec, tmp_path / "zoo", **quiet).trained == []
    touched = dataset / "images" / "misaligned" / "001.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert not is_current(spec, spec.expert("chip"), tmp_path / "zoo" / "chip")
    res = build_zoo(spec, tmp_path / "zoo", **quiet)
    assert res.trained == ["chip"] and res.skipped == ["router"]


def test_relative_paths_resolve_against_the_spec_file(dataset, tmp_path):
    spec = write_spec(dataset / "rel-spec.yaml", spec_data({"folder": "images"}))
    assert ld.data_path(spec, spec.expert("chip")) == dataset / "images"
    assert spec.model_copy(update={"seed": 3}).base_dir == dataset


def test_default_spec_fingerprints_unchanged():
    """Experts without training.data keep the fingerprint they had before training from files existed."""
    old_keys = ("target", "components", "defects", "label_map", "num_train_per_label", "epochs", "batch_size",
                "learning_rate")
    for data in (default_spec_data(), tiny_spec_data()):
        spec = parse_spec(data)
        for e in spec.experts:
            dumped = e.model_dump(include={"name", "architecture", "input_size_px", "labels", "training"})
            dumped["training"] = {k: dumped["training"][k] for k in old_keys}
            dumped["architecture"].pop("path", None)  # architecture.path came later too (brought checkpoints)
            old = {"expert": dumped, "seed": spec.seed, "generator": generator.GENERATOR_VERSION, "recipe": RECIPE_VERSION}
            assert fingerprint(spec, e) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest(), e.name
    spec = parse_spec(default_spec_data())  # as measured before this change (generator pcb-aoi-gen-3, recipe-1)
    assert fingerprint(spec, spec.expert("polarity")) == "4d78e80b1ec47e3a27cc07655a837c6acf8bd2737f83239fcdd9bb97fe068099"
    # re-pinned deliberately when the default spec's experts were retuned for accuracy (issue 15, item 6): a changed
    # pool and the baselines' new sizing (held-out active parameters, a second baseline of the total) change them
    assert fingerprint(spec, monolithic_spec(spec)) == "eff609440bbe588e80e0589dc24c7953dbdcd18d271b776247baeae9824ce1fd"
    assert fingerprint(spec, monolithic_spec(spec, "total")) == (
        "4e9d7be2afe6ebe3ca918e03ffbd945fa80ca6d078e1751573a9ecc1fd789a0b")


@pytest.mark.parametrize("training, message", [
    ({"data": {"folder": "a", "manifest": "b.csv"}}, "exactly one"),
    ({"data": {}}, "exactly one"),
    ({"data": {"folder": "a"}, "target": "defect"}, "do not apply"),
    ({"data": {"folder": "a", "label_field": "category"}}, "apply to a manifest"),
    ({"data": {"folder": "a"}, "augment": ["rot90", "shear"]}, "'shear'"),
    ({"epochs": 2}, "neither target nor data"),
    ({"data": {"folder": "a"}, "validation_fraction": 1.0}, "less than 1"),
])
def test_spec_refuses_bad_training_data_fields(training, message):
    data = spec_data({"folder": "a"})
    data["experts"][1]["training"] = training
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert any(message in str(p) for p in info.value.problems), [str(p) for p in info.value.problems]


def test_augment_none_and_defaults():
    from expertmesh.experts.training import resolve_plan

    spec = parse_spec(spec_data({"folder": "a"}, augment="none"))
    assert resolve_plan(spec.expert("chip").training).augment == ()
    plan = resolve_plan(parse_spec(spec_data({"folder": "a"})).expert("chip").training)
    assert (plan.validation_fraction, plan.test_fraction, plan.augment, plan.early_stopping_patience,
            plan.class_weighting) == (0.2, 0.2, ("hflip", "vflip"), 3, "none")  # chosen on real images
    generated = resolve_plan(parse_spec(spec_data({"folder": "a"})).expert("router").training)
    assert (generated.validation_fraction, generated.test_fraction, generated.augment,
            generated.early_stopping_patience, generated.class_weighting) == (0.0, 0.0, ("rot90", "hflip"), None, "none")


def test_early_stopping_waits_for_the_schedules_second_half():
    from expertmesh.experts.training import may_stop

    assert [e + 1 for e in range(40) if may_stop(e, 40)][0] == 21
    assert not may_stop(12, 40) and may_stop(20, 40) and may_stop(0, 1) and may_stop(1, 3)


def test_balanced_accuracy_sees_through_the_majority_answer():
    import torch

    from expertmesh.experts.training import scores

    y = torch.tensor([0] * 8 + [1, 2])
    always_ok = torch.zeros(10, dtype=torch.long)
    acc, balanced, verdict = scores(always_ok, y)
    assert acc == pytest.approx(0.8) and balanced == pytest.approx(1 / 3) and verdict is None
    acc2, balanced2, _ = scores(torch.tensor([0] * 5 + [1, 1, 1, 1, 2]), y)
    assert acc2 < acc and balanced2 > balanced  # the epoch a balanced loss should keep


def test_verdict_accuracy_counts_only_pass_or_not():
    """select_epoch_by verdict_accuracy: a wrong grade on the right side of pass/defect is no mistake."""
    import torch

    from expertmesh.experts.operating_point import pass_mask
    from expertmesh.experts.training import scores

    passing = pass_mask(["ok", "unlikely", "likely", "defective"], ["ok", "unlikely"])
    y = torch.tensor([0, 1, 2, 3])
    acc, _, verdict = scores(torch.tensor([1, 0, 3, 0]), y, passing)  # two grades swapped within a side, one escape
    assert acc == 0.0 and verdict == pytest.approx(0.75)
    with pytest.raises(ValueError, match="select_epoch_by verdict_accuracy needs pass_labels"):
        ExpertSpec(name="x", labels=["a", "b"],
                   training={"data": {"folder": "f"}, "select_epoch_by": "verdict_accuracy"})


def test_an_expert_starts_from_another_experts_backbone(dataset, tmp_path):
    """training.init_from: built after the expert it names (whatever the spec's order), from that expert's trained
    weights (a new head when the labels differ), and stale whenever that expert changes."""
    data = spec_data({"folder": str(dataset / "images")}, router_data={"folder": str(dataset / "categories")})
    first = data["experts"][1]
    second = {**first, "name": "chip2", "checkpoint": "chip2",
              "training": {**first["training"], "init_from": "chip", "epochs": 1, "learning_rate": 1e-9}}
    data["experts"].insert(1, second)  # listed before the expert it starts from
    data["categories"][1]["experts"] = ["chip2"]
    spec = write_spec(tmp_path / "spec.yaml", data)
    res = build_zoo(spec, tmp_path / "zoo", baselines=(), **quiet)
    assert res.trained.index("chip") < res.trained.index("chip2")
    a = load_file(str(tmp_path / "zoo" / "chip" / "model.safetensors"))
    b = load_file(str(tmp_path / "zoo" / "chip2" / "model.safetensors"))
    shared = [k for k in a if k in b and a[k].shape == b[k].shape and "classifier" not in k and "num_batches" not in k
              and "running" not in k]
    assert shared and all(torch.allclose(a[k], b[k], atol=1e-5) for k in shared)  # lr 1e-9: still chip's backbone
    changed = write_spec(tmp_path / "spec.yaml", {**data, "seed": 5})
    assert not is_current(changed, changed.expert("chip2"), tmp_path / "zoo" / "chip2")


@pytest.mark.parametrize("init_from,message", [
    ("ghost", "'ghost' is not another expert"), ("chip", "is not another expert"),
    ("router", "another architecture or input size"),
])
def test_init_from_must_name_a_matching_expert(init_from, message, dataset):
    data = spec_data({"folder": str(dataset / "images")}, init_from=init_from)
    if init_from == "router":
        data["experts"][0]["input_size_px"] = 48
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert message in str(info.value) and "init_from" in str(info.value)
