"""Expert runtime: tier moves, load/infer round trips from real checkpoints, and bad images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from expertmesh.errors import FailedPrecondition, InvalidArgument, PayloadTooLarge
from expertmesh.experts.models import build_model, load_model, parameter_bytes
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.images import decode_image, encode_png
from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.runtime import ExpertRuntime, Tier, resolve_device
from expertmesh.experts.spec import ImageLimits, resolve_checkpoint


def runtime(spec, zoo, name="polarity"):
    e = spec.expert(name)
    return ExpertRuntime(e, resolve_checkpoint(e, zoo), device="cpu", image_limits=spec.image)


def png(img: Image.Image) -> bytes:
    return encode_png(img)


def test_tier_moves_are_timed_and_measured(tiny_spec, tiny_zoo):
    rt = runtime(tiny_spec, tiny_zoo)
    assert rt.tier is Tier.DISK and rt.footprint_bytes > 0  # known from the checkpoint's header, before any load
    moves = rt.load()
    assert [(m.source, m.target) for m in moves] == [(Tier.DISK, Tier.HOST), (Tier.HOST, Tier.DEVICE)]
    assert moves[0].seconds > 0 and moves[0].num_bytes == rt.footprint_bytes > 0
    assert moves[1].num_bytes == rt.footprint_bytes  # one copy of the weights onto the device
    assert rt.on_device and rt.in_host  # the tiers are inclusive: the host copy stays
    assert rt.load() == []  # already resident
    off = rt.offload()
    assert off.target is Tier.HOST and off.num_bytes == 0 and rt.tier is Tier.HOST  # the host copy was there: free
    assert [m.source for m in rt.load()] == [Tier.HOST]
    assert rt.unload().target is Tier.DISK and rt.tier is Tier.DISK
    assert rt.unload() is None


def test_host_copy_can_be_dropped_and_remade(tiny_spec, tiny_zoo):
    rt = runtime(tiny_spec, tiny_zoo)
    x = to_pixel_values(np.zeros((2, 64, 64, 3), np.uint8), 64)
    rt.load(keep_host_copy=False)
    assert rt.on_device and not rt.in_host
    first = rt.infer(x)
    off = rt.offload()  # no host copy left: the device copy is copied back
    assert off.num_bytes == rt.footprint_bytes and rt.in_host and not rt.on_device
    rt.load()
    assert rt.drop_host_copy() and rt.tier is Tier.DEVICE and rt.infer(x) == first
    assert rt.fetch_to_host() is None  # on the device: nothing to fetch
    rt.unload()
    assert rt.fetch_to_host().target is Tier.HOST and rt.tier is Tier.HOST


def test_footprint_is_parameters_plus_buffers(tiny_spec, tiny_zoo):
    rt = runtime(tiny_spec, tiny_zoo, "component_classifier")
    rt.load()
    model = load_model(rt.spec, rt.checkpoint_dir)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert buffer_bytes > 0  # batch-norm statistics count too
    assert rt.footprint_bytes == parameter_bytes(model) == 4 * rt.num_parameters + buffer_bytes


def test_reloaded_checkpoint_predicts_like_the_saved_model(tiny_spec, tiny_zoo):
    rt = runtime(tiny_spec, tiny_zoo, "component_classifier")
    rt.load()
    imgs = [generator.generate(c, "ok", 5, 0) for c in generator.COMPONENTS]
    preds = rt.infer_images([png(i) for i in imgs])
    assert len(preds) == len(imgs) and all(p.label in rt.spec.labels and 0 < p.score <= 1 for p in preds)
    rt.unload()
    rt.load()
    again = rt.infer(to_pixel_values(imgs, rt.spec.input_size_px))
    assert [(p.label, round(p.score, 5)) for p in preds] == [(p.label, round(p.score, 5)) for p in again]


def test_infer_needs_load_and_the_right_shape(tiny_spec, tiny_zoo):
    rt = runtime(tiny_spec, tiny_zoo)
    with pytest.raises(FailedPrecondition, match="call load"):
        rt.infer(torch.zeros(1, 3, 64, 64))
    rt.load()
    with pytest.raises(InvalidArgument, match=r"expected \[N, 3, 64, 64\]"):
        rt.infer(torch.zeros(1, 3, 32, 32))


def test_checkpoint_with_other_labels_is_refused(tiny_spec, tiny_zoo):
    e = tiny_spec.expert("polarity").model_copy(update={"labels": ["correct", "flipped"]})
    with pytest.raises(FailedPrecondition, match="rebuild the zoo"):
        ExpertRuntime(e, resolve_checkpoint(e, tiny_zoo), device="cpu").load()


def test_cuda_preference_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(FailedPrecondition, match="no CUDA device"):
        resolve_device("cuda")


LIMITS = ImageLimits(max_bytes=64 * 1024, min_side_px=32, max_side_px=512, max_aspect_ratio=2.0)


def encoded(size, fmt="PNG", noise=False) -> bytes:
    arr = np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8) if noise else np.zeros((*size[::-1], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("data, error, fragment", [
    (b"", InvalidArgument, "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, InvalidArgument, "could not be decoded"),
    (b"hello, not an image", InvalidArgument, "could not be decoded"),
    (encoded((300, 300), noise=True), PayloadTooLarge, "over the limit"),
    (encoded((16, 16)), InvalidArgument, "each side must be 32..512"),
    (encoded((1024, 40)), InvalidArgument, "each side must be"),
    (encoded((200, 60)), InvalidArgument, "aspect ratio"),
    (encoded((64, 64), fmt="GIF"), InvalidArgument, "format 'GIF'"),
])
def test_bad_images_get_clear_errors(data, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        decode_image(data, LIMITS, field="image")
    assert info.value.field == "image" and info.value.fix


def test_truncated_png_is_refused():
    data = png(generator.generate("led", "ok", 0, 0))
    with pytest.raises(InvalidArgument, match="could not be decoded"):
        decode_image(data[: len(data) // 2], LIMITS)


def test_good_png_and_jpeg_decode():
    img = generator.generate("led", "ok", 0, 0)
    assert decode_image(png(img), LIMITS).size == img.size
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    assert decode_image(buf.getvalue(), LIMITS).mode == "RGB"


def test_bad_image_in_a_batch_names_its_index(tiny_spec, tiny_zoo):
    rt = runtime(tiny_spec, tiny_zoo)
    rt.load()
    good = png(generator.generate("led", "ok", 0, 0))
    with pytest.raises(InvalidArgument) as info:
        rt.infer_images([good, b""])
    assert info.value.field == "images[1]"


@pytest.mark.gpu
def test_cuda_round_trip(tiny_spec, tiny_zoo):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this host")
    e = tiny_spec.expert("polarity")
    rt = ExpertRuntime(e, resolve_checkpoint(e, tiny_zoo), device="cuda")
    moves = rt.load()
    assert moves[1].num_bytes == rt.footprint_bytes > 0
    used = torch.cuda.memory_allocated()
    assert used >= rt.footprint_bytes
    preds = rt.infer(to_pixel_values([generator.generate("led", "ok", 0, 0)], 64))
    assert preds[0].label in e.labels
    rt.offload()
    assert torch.cuda.memory_allocated() < used


def test_vit_family_round_trip(tmp_path):
    """Both supported architecture families build from a config, save with save_pretrained and load back."""
    from expertmesh.experts.models import build_model
    from expertmesh.experts.spec import ExpertSpec

    e = ExpertSpec.model_validate({
        "name": "vit_probe", "task": "classify", "checkpoint": str(tmp_path / "vit"), "input_size_px": 32,
        "labels": ["ok", "bad"], "architecture": {"family": "vit", "config": {
            "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}}})
    build_model(e, seed=0).save_pretrained(str(tmp_path / "vit"))
    assert sorted(p.name for p in (tmp_path / "vit").iterdir()) == ["config.json", "model.safetensors"]
    rt = ExpertRuntime(e, tmp_path / "vit", device="cpu")
    rt.load()
    preds = rt.infer(to_pixel_values([generator.generate("led", "ok", 0, 0)], 32))
    assert preds[0].label in ("ok", "bad")


def test_architecture_config_may_not_set_derived_keys():
    from pydantic import ValidationError

    from expertmesh.experts.spec import ArchitectureSpec

    with pytest.raises(ValidationError, match="derived from the expert"):
        ArchitectureSpec(family="resnet", config={"num_labels": 3})


def test_every_family_predicts_the_same_after_a_round_trip_through_host_memory(tiny_spec, tiny_zoo, tmp_path):
    """The device copy is rebuilt from the modules kept on `meta` and the host copy: same outputs as a fresh load."""
    vit = tiny_spec.expert("polarity").model_copy(update={
        "architecture": tiny_spec.expert("polarity").architecture.model_copy(update={
            "family": "vit", "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "intermediate_size": 64, "patch_size": 16}})})
    build_model(vit, seed=0).save_pretrained(tmp_path / "vit")
    for rt in (runtime(tiny_spec, tiny_zoo, "component_classifier"), ExpertRuntime(vit, tmp_path / "vit", device="cpu")):
        x = to_pixel_values(np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8), 64)
        rt.load()
        first = rt.infer(x)
        rt.offload()
        rt.load()
        assert rt.infer(x) == first
        rt.unload()
        rt.load()
        assert rt.infer(x) == first
