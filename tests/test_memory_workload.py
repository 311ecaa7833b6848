"""The memory-limited benchmark's seeded workload: a small CoE builds in seconds, loads with its zoo, is skipped when
built; the request stream is deterministic and Zipf-skewed; bad configs say what to change. No Ray."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from expertmesh.bench.memory_workload import (SPEC_FILE, ZOO_DIR, MemoryWorkloadConfig, WorkloadRequest,
                                              build_workload_coe, default_workload_dir, expert_bytes, is_built,
                                              make_requests, request_images, spec_data, workload_summary)
from expertmesh.bench.memory_workload_calibrate import calibrate_bias, choose_on_labels, label_shares
from expertmesh.bench.memory_workload_layout import plan_layout
from expertmesh.bench.memory_workload_requests import ranked_categories
from expertmesh.errors import InvalidArgument
from expertmesh.experts.graph import longest_chain
from expertmesh.experts.models import load_model, parameter_bytes
from expertmesh.experts.spec import load_spec, parse_spec, resolve_checkpoint

SMALL = MemoryWorkloadConfig(num_small_experts=6, num_large_experts=2, input_size_px=32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory-coe")
    lines: list[str] = []
    spec_path = build_workload_coe(out, SMALL, progress=lines.append)
    return out, spec_path, lines


def layout_spec(config: MemoryWorkloadConfig):
    """The spec a config implies, with placeholder trigger labels (no models built)."""
    layout = plan_layout(config)
    deps = [{"upstream": e.upstream, "on_labels": [layout.expert(e.upstream).labels[0]], "downstream": e.downstream}
            for e in layout.edges]
    return parse_spec(spec_data(layout, config, deps))


def test_small_workload_builds_and_loads_with_its_zoo(built):
    out, spec_path, lines = built
    assert spec_path == out / SPEC_FILE
    spec = load_spec(spec_path, zoo_root=out / ZOO_DIR)  # check_spec with the zoo: every checkpoint on disk
    assert len(spec.experts) == 8 and len(lines) == 8 + 2  # a line per checkpoint, plus the first and the last
    assert sum(line.startswith("[") for line in lines) == 8
    assert abs(sum(c.probability for c in spec.categories) - 1) < 1e-9
    assert sorted(spec.router_expert.labels) == sorted(c.name for c in spec.categories)
    assert longest_chain(spec) == 2  # component -> detector -> fine
    for d in spec.dependencies:
        assert 0.02 < d.trigger_probability < 0.8, d
    model = load_model(spec.router_expert, resolve_checkpoint(spec.router_expert, out / ZOO_DIR))
    assert model.config.num_labels == len(spec.categories)


def test_expert_bytes_read_from_headers_match_the_models_and_large_ones_dominate(built):
    out, spec_path, _ = built
    spec = load_spec(spec_path)
    sizes = expert_bytes(spec, out / ZOO_DIR)
    for name in ("component_router", "solder_joint_detector"):
        e = spec.expert(name)
        assert sizes[name] == parameter_bytes(load_model(e, resolve_checkpoint(e, out / ZOO_DIR)))
    summary = workload_summary(spec, out / ZOO_DIR)
    assert summary["num_large_experts"] == 2 and summary["large_bytes"] > 0.9 * summary["total_bytes"]
    assert summary["one_third_bytes"] < summary["max_expert_bytes"]  # a third of the bytes cannot hold both detectors


def test_rebuild_of_the_same_config_is_skipped(built):
    out, spec_path, _ = built
    ckpt = out / ZOO_DIR / "solder_joint_detector" / "model.safetensors"
    before = ckpt.stat().st_mtime_ns
    lines: list[str] = []
    assert build_workload_coe(out, SMALL, progress=lines.append) == spec_path
    assert len(lines) == 1 and "up to date" in lines[0] and ckpt.stat().st_mtime_ns == before
    assert not is_built(out, SMALL.model_copy(update={"seed": 1}))


def test_default_config_makes_48_experts_with_chains_and_a_skewed_mix():
    spec = layout_spec(MemoryWorkloadConfig())
    large = [e for e in spec.experts if e.architecture.config["hidden_sizes"][-1] == 512]
    assert len(spec.experts) == 48 and len(large) == 8
    assert 24 <= len(spec.categories) <= 32 and longest_chain(spec) == 2
    shared = [c.experts[0] for c in spec.categories]
    assert len(set(shared)) < len(shared)  # similar component types share an expert
    probs = sorted((c.probability for c in spec.categories), reverse=True)
    assert probs[0] > 5 * probs[len(probs) // 2]
    assert all(any(d.downstream == e.name for d in spec.dependencies) for e in large)


def test_large_configs_keep_names_unique_and_every_expert_reached():
    spec = layout_spec(MemoryWorkloadConfig(num_small_experts=120, num_large_experts=11))  # parse_spec checks both
    assert len(spec.experts) == 131 and len(spec.categories) > 32


def test_make_requests_is_deterministic_zipf_skewed_and_a_prefix_stream():
    spec = layout_spec(MemoryWorkloadConfig())
    a = make_requests(spec, 20_000, seed=3)
    assert a == make_requests(spec, 20_000, seed=3)
    assert a[:500] == make_requests(spec, 500, seed=3)
    assert a != make_requests(spec, 20_000, seed=4)
    assert isinstance(a[0], WorkloadRequest) and [r.station for r in a[:9]] == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert all(r.calls == tuple(spec.category(r.category).experts) for r in a[:200])
    ranked = ranked_categories(spec)
    counts = np.array([sum(r.category == c for r in a) for c in ranked], dtype=float) / len(a)
    weights = 1 / np.arange(1, len(ranked) + 1) ** 1.1
    np.testing.assert_allclose(counts, weights / weights.sum(), atol=0.015)
    uniform = make_requests(spec, 20_000, seed=3, zipf_s=0.0)
    shares = np.array([sum(r.category == c for r in uniform) for c in ranked]) / len(uniform)
    assert shares.max() < 2 / len(ranked)
    assert len({r.image_seed for r in a}) == len(a)


def test_request_images_are_deterministic_smooth_patterns(built):
    out, spec_path, _ = built
    spec = load_spec(spec_path)
    r1, r2 = make_requests(spec, 2, seed=0)
    images = request_images(spec, r1)
    assert set(images) == {32} and images[32].shape == (1, 32, 32, 3) and images[32].dtype == np.uint8
    assert np.array_equal(images[32], request_images(spec, r1)[32])
    assert not np.array_equal(images[32], request_images(spec, r2)[32])
    img = images[32][0].astype(float)
    neighbour = np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1]
    assert neighbour > 0.8 and img.std() > 10  # smooth, not white noise, and not flat


@pytest.mark.parametrize("kwargs, words", [
    ({"num_small_experts": 3}, ["num_small_experts is 3", "use 4 to"]),
    ({"num_large_experts": 0}, ["num_large_experts is 0", "use 1 to"]),
    ({"input_size_px": 16}, ["input_size_px is 16", "use 32 to"]),
    ({"seed": -1}, ["seed is -1", "0 or more"]),
    ({"num_small_experts": 6, "num_large_experts": 8}, ["gives 3 component experts", "raise num_small_experts to"]),
    ({"num_tiny": 3}, ["num_tiny", "Extra inputs are not permitted"]),
])
def test_bad_configs_name_the_value_and_the_fix(kwargs, words):
    with pytest.raises(ValidationError) as exc:
        MemoryWorkloadConfig(**kwargs)
    for w in words:
        assert w in str(exc.value)


def test_bad_request_stream_arguments_name_the_field():
    spec = layout_spec(SMALL)
    for kwargs, field in (({"num_requests": -1}, "num_requests"), ({"num_requests": 1, "zipf_s": -1}, "zipf_s"),
                          ({"num_requests": 1, "num_stations": 0}, "num_stations")):
        with pytest.raises(InvalidArgument) as exc:
            make_requests(spec, seed=0, **kwargs)
        assert exc.value.field == field and exc.value.fix


def test_default_dir_is_under_expertmesh_home(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path))
    assert default_workload_dir() == tmp_path / "bench" / "memory-coe"


def test_calibration_lands_label_shares_and_trigger_labels_near_their_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.05, (400, 4)) + np.array([0.3, 0.0, -0.1, 0.05])  # one label would win most images
    target = [0.4, 0.3, 0.2, 0.1]
    shares = label_shares((logits + calibrate_bias(logits, target)).argmax(axis=1), 4)
    assert np.abs(shares - target).sum() / 2 < 0.03
    labels = rng.choice(4, size=1000, p=target)
    on, rate = choose_on_labels(labels, np.ones(1000), ["a", "b", "c", "d"], 0.5)
    assert on in (["a", "d"], ["b", "c"]) and abs(rate - 0.5) < 0.05
    on, rate = choose_on_labels(labels, (labels >= 2).astype(float), ["a", "b", "c", "d"], 0.3)
    assert on == ["d"] and abs(rate - 1 / 3) < 0.05  # only the images labelled c or d reach the upstream
