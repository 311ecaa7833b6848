"""Bringing a checkpoint (issue 15 item 2): an expert points at a local HF image-classification checkpoint of a
family other than resnet/vit; spec errors name the path; its preprocessor_config.json is honoured; zoo build imports
it as is (fingerprint: its content) or fine-tunes it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (ConvNextConfig, ConvNextForImageClassification, MobileNetV2Config,
                          MobileNetV2ForImageClassification)

from expertmesh.errors import SpecError
from expertmesh.experts.runtime import ExpertRuntime
from expertmesh.experts.spec import parse_spec, resolve_checkpoint
from expertmesh.experts.zoo import build_zoo, is_current

CATEGORIES = ["chip", "ic", "cap"]
DEFECTS = ["ok", "bad"]
CONVNEXT_PRE = {"do_resize": True, "size": {"shortest_edge": 40}, "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [0.2, 0.3, 0.4], "image_std": [0.1, 0.2, 0.3]}
MOBILENET_PRE = {"do_resize": True, "size": {"height": 24, "width": 24}, "do_center_crop": False,
                 "do_normalize": True, "image_mean": [0.6, 0.5, 0.4], "image_std": [0.25, 0.25, 0.5]}


def _save(model, directory, pre):
    torch.manual_seed(0)
    model.eval().save_pretrained(str(directory))
    if pre is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(pre))


def _convnext(labels):
    return ConvNextForImageClassification(ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)}))


def _mobilenet(labels):
    return MobileNetV2ForImageClassification(MobileNetV2Config(
        depth_multiplier=0.35, image_size=24, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)}))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("brought")
    torch.manual_seed(1)
    _save(_convnext(CATEGORIES), root / "convnext", CONVNEXT_PRE)
    torch.manual_seed(2)
    _save(_mobilenet(DEFECTS), root / "mobilenet", MOBILENET_PRE)
    return root


def spec_data(router_path="convnext", expert_path="mobilenet", **expert_kw):
    expert = {"name": "defect", "task": "classify", "checkpoint": "defect",
              "architecture": {"family": "pretrained", "path": expert_path},
              "input_size_px": 24, "labels": DEFECTS, "pass_labels": ["ok"]}
    expert.update(expert_kw)
    return {
        "name": "brought", "router": {"expert": "router"},
        "experts": [{"name": "router", "task": "route", "checkpoint": "router",
                     "architecture": {"family": "pretrained", "path": router_path},
                     "input_size_px": 32, "labels": CATEGORIES}, expert],
        "categories": [{"name": c, "experts": ["defect"], "probability": p}
                       for c, p in zip(CATEGORIES, (0.5, 0.25, 0.25))],
    }


def problems(data, base_dir):
    with pytest.raises(SpecError) as info:
        parse_spec(data, base_dir=base_dir)
    return info.value.problems


def test_spec_accepts_local_checkpoints(ckpts):
    spec = parse_spec(spec_data(), base_dir=ckpts)
    assert spec.expert("router").architecture.family == "pretrained"
    # absolute paths work too; a config or a missing path is refused at the field
    parse_spec(spec_data(router_path=str(ckpts / "convnext"), expert_path=str(ckpts / "mobilenet")), base_dir="/")
    data = spec_data()
    data["experts"][0]["architecture"]["config"] = {"depths": [1]}
    assert "remove config" in str(problems(data, ckpts)[0])
    data = spec_data()
    del data["experts"][0]["architecture"]["path"]
    assert "needs path" in str(problems(data, ckpts)[0])


def test_missing_directory_and_config_name_the_path(ckpts, tmp_path):
    (p,) = problems(spec_data(expert_path="nowhere"), ckpts)
    assert p.field == "experts[1].architecture.path" and str(ckpts / "nowhere") in p.message and "downloaded" in p.fix
    (tmp_path / "empty").mkdir()
    (p,) = problems(spec_data(expert_path=str(tmp_path / "empty")), ckpts)
    assert "no config.json" in p.message and str(tmp_path / "empty") in p.message


def test_label_mismatch_and_size_mismatch(ckpts):
    (p,) = problems(spec_data(labels=["bad", "ok"], pass_labels=["ok"]), ckpts)
    assert p.field == "experts[1].labels" and "['ok', 'bad']" in p.message and "['bad', 'ok']" in p.message
    (p,) = problems(spec_data(input_size_px=32), ckpts)
    assert p.field == "experts[1].input_size_px" and "32" in p.message and "24x24" in p.message
    assert p.fix == "set input_size_px: 24"
    # fine-tuning gives the checkpoint a new head: other labels are fine then
    parse_spec(spec_data(labels=["good", "scratch", "void"], pass_labels=["good"],
                         training={"data": {"folder": "imgs"}}), base_dir=ckpts)


def _expected(img: Image.Image, pre: dict) -> np.ndarray:
    """What preprocessor_config.json implies, computed independently (PIL + numpy)."""
    w, h = img.size
    if "shortest_edge" in pre["size"]:
        s = pre["size"]["shortest_edge"]
        size = (s, round(h * s / w)) if w <= h else (round(w * s / h), s)
    else:
        size = (pre["size"]["width"], pre["size"]["height"])
    a = np.asarray(img.resize(size, Image.BILINEAR), np.float32)
    if pre.get("do_center_crop"):
        ch, cw = pre["crop_size"]["height"], pre["crop_size"]["width"]
        top, left = (a.shape[0] - ch) // 2, (a.shape[1] - cw) // 2
        a = a[top:top + ch, left:left + cw]
    a = (a / 255 - np.float32(pre["image_mean"])) / np.float32(pre["image_std"])
    return a.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def zoo(ckpts, tmp_path_factory):
    spec = parse_spec(spec_data(), base_dir=ckpts)
    root = tmp_path_factory.mktemp("zoo")
    result = build_zoo(spec, root, progress=False, log=lambda *_: None)
    return spec, root, result


def test_zoo_imports_as_is_and_notices_a_changed_checkpoint(zoo, ckpts, tmp_path):
    spec, root, result = zoo
    assert sorted(result.trained) == ["defect", "router"]  # imported, never trained; no baseline (none generated)
    for e in spec.experts:
        ckpt = resolve_checkpoint(e, root)
        assert is_current(spec, e, ckpt) and (ckpt / "preprocessor_config.json").is_file()
        meta = json.loads((ckpt / "expertmesh.json").read_text())
        assert meta["train"] is None and meta["pretrained"].endswith(e.architecture.path)
    assert build_zoo(spec, root, progress=False, log=lambda *_: None).skipped == ["router", "defect"]
    # a changed checkpoint (same place, other weights) is noticed
    import shutil
    shutil.copytree(ckpts / "mobilenet", tmp_path / "mobilenet")
    moved = parse_spec(spec_data(expert_path=str(tmp_path / "mobilenet")), base_dir=ckpts)
    ckpt = resolve_checkpoint(moved.expert("defect"), root)
    assert is_current(moved, moved.expert("defect"), ckpt)  # same content: still current
    torch.manual_seed(9)
    _save(_mobilenet(DEFECTS), tmp_path / "mobilenet", MOBILENET_PRE)
    assert not is_current(moved, moved.expert("defect"), ckpt)


@pytest.mark.parametrize("name,pre", [("router", CONVNEXT_PRE), ("defect", MOBILENET_PRE)])
def test_runtime_honours_the_preprocessor_and_returns_the_checkpoint_labels(zoo, ckpts, name, pre):
    spec, root, _ = zoo
    e = spec.expert(name)
    rt = ExpertRuntime(e, resolve_checkpoint(e, root), device="cpu", image_limits=spec.image)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 64, 3), dtype=np.uint8))  # not square: the crop matters
    px = rt.pixel_values([img])
    assert px.shape == (1, 3, e.input_size_px, e.input_size_px)
    np.testing.assert_allclose(px[0].numpy(), _expected(img, pre), atol=1e-4)
    rt.load()
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    (pred,) = rt.infer_images([buf.getvalue()])
    model = (ConvNextForImageClassification if name == "router" else MobileNetV2ForImageClassification
             ).from_pretrained(str(ckpts / e.architecture.path), local_files_only=True).eval()
    with torch.no_grad():
        probs = torch.softmax(model(pixel_values=torch.from_numpy(_expected(img, pre))[None]).logits, -1)[0]
    assert pred.label == model.config.id2label[int(probs.argmax())] and pred.label in e.labels
    assert pred.score == pytest.approx(float(probs.max()), abs=1e-4)


def test_fine_tune_from_a_checkpoint_with_new_labels(ckpts, tmp_path):
    labels = ["good", "scratch", "void"]
    rng = np.random.default_rng(1)
    for i, label in enumerate(labels):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for j in range(6):
            a = np.full((28, 28, 3), 60 * i + 20, np.uint8) + rng.integers(0, 20, (28, 28, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "imgs" / label / f"{j}.png")
    data = spec_data(expert_path=str(ckpts / "mobilenet"), labels=labels, pass_labels=["good"],
                     training={"data": {"folder": "imgs"}, "epochs": 1, "batch_size": 4, "validation_fraction": 0.0,
                               "test_fraction": 0.0})  # every image trains
    data["experts"][0]["architecture"]["path"] = str(ckpts / "convnext")
    spec = parse_spec(data, base_dir=tmp_path)
    root = tmp_path / "zoo"
    result = build_zoo(spec, root, only=["defect"], progress=False, log=lambda *_: None)
    assert result.trained == ["defect"] and result.stats["defect"]["num_images"] == 18
    e = spec.expert("defect")
    rt = ExpertRuntime(e, resolve_checkpoint(e, root), device="cpu")
    rt.load()
    preds = rt.infer(rt.pixel_values(np.zeros((2, 24, 24, 3), np.uint8)))
    assert all(p.label in labels for p in preds) and rt.processing is not None
