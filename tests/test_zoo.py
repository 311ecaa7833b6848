"""The zoo builder: a tiny zoo in seconds, deterministic for a seed, current checkpoints skipped."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from expertmesh.errors import InvalidArgument
from expertmesh.experts.pcb_aoi.dataset import expert_samples, per_pair_counts
from expertmesh.experts.spec import check_spec, parse_spec, resolve_checkpoint
from expertmesh.experts.zoo import (BASELINE_SETS, BASELINE_TOTAL_DIR, DEFAULT_BASELINES, META_FILE, build_zoo,
                                    expert_parameters, fingerprint, heldout_active_parameters, is_current,
                                    monolithic_spec, total_parameters)

from conftest import tiny_spec_data

quiet = dict(progress=False, log=lambda *_: None)


def test_tiny_zoo_has_every_checkpoint(tiny_spec, tiny_zoo):
    assert check_spec(tiny_spec, tiny_zoo) == []
    meta = json.loads((tiny_zoo / "polarity" / META_FILE).read_text())
    assert meta["labels"] == ["correct", "reversed_polarity"] and meta["fingerprint"] == fingerprint(tiny_spec, tiny_spec.expert("polarity"))


def test_rebuild_skips_current_checkpoints(tiny_spec, tiny_zoo):
    res = build_zoo(tiny_spec, tiny_zoo, baselines=(), **quiet)
    assert res.trained == [] and len(res.skipped) == len(tiny_spec.experts)


def test_same_seed_same_weights_and_config_change_retrains(tiny_spec, tiny_zoo, tmp_path):
    res = build_zoo(tiny_spec, tmp_path, only=["polarity"], baselines=(), **quiet)
    assert res.trained == ["polarity"]
    a, b = load_file(tiny_zoo / "polarity" / "model.safetensors"), load_file(tmp_path / "polarity" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    data = tiny_spec_data()
    polarity = next(e for e in data["experts"] if e["name"] == "polarity")
    polarity["training"] = {**polarity["training"], "epochs": 2}
    changed = parse_spec(data)
    assert not is_current(changed, changed.expert("polarity"), tmp_path / "polarity")
    assert is_current(changed, changed.expert("chip_defect"), resolve_checkpoint(changed.expert("chip_defect"), tiny_zoo))
    assert build_zoo(changed, tmp_path, only=["polarity"], baselines=(), **quiet).trained == ["polarity"]


def test_other_seed_other_weights(tiny_spec, tmp_path):
    other = tiny_spec.model_copy(update={"seed": 1})
    assert fingerprint(other, other.expert("polarity")) != fingerprint(tiny_spec, tiny_spec.expert("polarity"))


def test_unknown_expert_in_only(tiny_spec, tmp_path):
    with pytest.raises(InvalidArgument, match="unknown experts"):
        build_zoo(tiny_spec, tmp_path, only=["nope"], **quiet)


def test_unknown_baseline(tiny_spec, tmp_path):
    with pytest.raises(InvalidArgument, match="unknown baselines"):
        build_zoo(tiny_spec, tmp_path, baselines=["monolithic_all"], **quiet)


def test_default_build_skips_the_total_baseline_unless_named(tiny_spec, tiny_zoo, tmp_path):
    """make run's build trains the matched-active baseline only; `only` naming the other one builds it."""
    assert DEFAULT_BASELINES == ("monolithic",) and BASELINE_SETS["all"] == ("monolithic", "monolithic_total")
    shutil.copytree(tiny_zoo, tmp_path / "zoo")
    res = build_zoo(tiny_spec, tmp_path / "zoo", only=["monolithic_total"], baselines=(), **quiet)
    assert res.trained == ["monolithic_total"] and (tmp_path / "zoo" / BASELINE_TOTAL_DIR / "model.safetensors").is_file()
    res = build_zoo(tiny_spec, tmp_path / "zoo", **quiet)  # the default: the experts (current) and `monolithic`
    assert res.trained == ["monolithic"] and "monolithic_total" not in res.skipped


def test_training_data_plan(default_spec):
    pol = expert_samples(default_spec, default_spec.expert("polarity"))
    assert {s.component for s in pol} == {"soic", "electrolytic_capacitor", "diode", "led"}  # its upstreams' parts
    assert {(s.defect, s.label) for s in pol} == {("ok", "correct"), ("reversed_polarity", "reversed_polarity")}
    chip = per_pair_counts(default_spec, default_spec.expert("chip_defect"))
    n = default_spec.expert("chip_defect").training.num_train_per_label
    # "ok" comes from 2 parts, "solder_suspect" from 2 parts x 2 solder defects: each label still gets n images
    assert chip[("chip_resistor", "ok")] == n // 2 and chip[("chip_resistor", "solder_bridge")] == n // 4
    router = expert_samples(default_spec, default_spec.router_expert)
    assert {s.label for s in router} == set(default_spec.router_expert.labels)


def test_monolithic_baselines_match_active_and_total_parameters(default_spec):
    active, total = monolithic_spec(default_spec, "active"), monolithic_spec(default_spec, "total")
    assert (active.name, total.name) == ("monolithic", "monolithic_total")
    for mono in (active, total):
        assert len(mono.labels) == 49 and mono.input_size_px == 96
        assert mono.training == active.training  # the same budget rules for both
    target = heldout_active_parameters(default_spec)
    assert abs(expert_parameters(active) - target) / target < 0.1
    assert abs(expert_parameters(total) - total_parameters(default_spec)) / total_parameters(default_spec) < 0.05
    # the total one keeps the active one's stages and adds a fourth, so both cost about the same per image
    assert total.architecture.config["hidden_sizes"][:3] == active.architecture.config["hidden_sizes"]


def test_heldout_active_parameters_follow_the_true_plan(default_spec):
    """Every pair equally: the router, the category's expert, and what its true output triggers."""
    p = {e.name: expert_parameters(e) for e in default_spec.experts}
    # chip_resistor: 5 pairs, 2 of them solder defects (-> solder_fine); likewise for the other parts
    chip = 5 * (p["component_classifier"] + p["chip_defect"]) + 2 * p["solder_fine"]
    value = heldout_active_parameters(default_spec)
    assert p["component_classifier"] + min(p.values()) < value < p["component_classifier"] + max(p.values()) + p["solder_fine"]
    only_chips = default_spec.model_copy(update={"categories": [c for c in default_spec.categories
                                                               if c.experts == ["chip_defect"]]})
    # the other categories' pairs then run the router only
    assert heldout_active_parameters(only_chips) * 49 == pytest.approx(2 * chip + 39 * p["component_classifier"])