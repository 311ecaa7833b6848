"""Every CoE spec example in README.md and docs/ passes `expertmesh spec check` as written (a YAML block with a
top-level `experts:` is a spec example), and the README's own-data spec is exactly what `make own-data-demo` writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import ConvNextConfig, ConvNextForImageClassification

from expertmesh.bench.own_data_demo import spec_data as demo_spec_data
from expertmesh.cli import main
from expertmesh.experts.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def spec_blocks() -> list[tuple[str, str]]:
    """(where, text) of every ```yaml block whose top level has `experts:`."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"```ya?ml\n(.*?)```", text, re.S):
            if re.search(r"^experts:", m.group(1), re.M):
                out.append((f"{path.name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
    return out


BLOCKS = spec_blocks()


def test_the_docs_have_spec_examples():
    assert len(BLOCKS) >= 3, BLOCKS


def _checkpoint_for(spec: dict, base: Path) -> None:
    """A `family: pretrained` example points at a directory on the user's disk: write a small real one there with
    the labels and preprocessed size the example names."""
    for e in spec["experts"]:
        arch = e.get("architecture") or {}
        if arch.get("family") != "pretrained":
            continue
        labels, size = e["labels"], e["input_size_px"]
        torch.manual_seed(0)
        model = ConvNextForImageClassification(ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)}))
        target = base / arch["path"]
        model.save_pretrained(str(target))
        (target / "preprocessor_config.json").write_text(json.dumps(
            {"do_resize": True, "size": {"height": size, "width": size}, "do_normalize": False}))


@pytest.mark.parametrize("where,text", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_spec_example_passes_spec_check(where, text, tmp_path, capsys):
    _checkpoint_for(yaml.safe_load(text), tmp_path)
    path = tmp_path / "example.yaml"
    path.write_text(text)
    code = main(["spec", "check", str(path), "--skip-checkpoints"])
    out = capsys.readouterr()
    assert code == 0, f"{where}:\n{out.err}"
    assert ": OK: CoE" in out.out


def test_readme_own_data_spec_is_what_the_demo_writes():
    readme = next(text for where, text in BLOCKS if "name: factory-coe" in text)
    assert parse_spec(yaml.safe_load(readme)) == parse_spec(demo_spec_data())


def test_readme_real_data_spec_is_what_the_real_data_demo_writes():
    from expertmesh.bench.real_data_demo import spec_data as real_spec_data

    readme = next(text for where, text in BLOCKS if "name: solar-cells" in text)
    assert parse_spec(yaml.safe_load(readme)) == parse_spec(real_spec_data())


def test_spec_check_prints_the_defaults_it_chose(tmp_path, capsys):
    readme = next(text for where, text in BLOCKS if "name: factory-coe" in text)
    (tmp_path / "s.yaml").write_text(readme)
    assert main(["spec", "check", str(tmp_path / "s.yaml"), "--skip-checkpoints"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("part_family") and "task" in x)
    assert "task route" in line and "checkpoint part_family" in line and "input_size_px 64" in line
    assert "architecture resnet 16-32-64 channels" in line
    assert "passive_aoi" in out and "task classify" in out


def test_defaults_equal_what_pcb_aoi_writes_out(default_spec):
    """A spec that leaves the defaults out builds the same experts as one that writes pcb-aoi's values in full."""
    chip = default_spec.expert("chip_defect")
    written = chip.model_dump(mode="json")
    short = {k: v for k, v in written.items() if k not in ("task", "architecture", "checkpoint", "input_size_px")}
    data = {"name": "x", "router": {"expert": "r"},
            "experts": [{"name": "r", "labels": ["a", "b"]}, short],
            "categories": [{"name": "a", "experts": ["chip_defect"], "probability": 0.5},
                           {"name": "b", "experts": ["chip_defect"], "probability": 0.5}]}
    spec = parse_spec(data)
    assert spec.expert("chip_defect") == chip and spec.expert("r").task == "route"
    assert spec.expert("chip_defect").defaults_chosen() and not chip.defaults_chosen()
