"""Spec validation: the default spec is valid; each kind of mistake gives one problem naming field and fix."""

from __future__ import annotations

import pytest
import yaml

from expertmesh.cli import main
from expertmesh.errors import CLI_EXIT_CODE, SpecError
from expertmesh.experts.spec import check_spec, load_spec, parse_spec
from expertmesh.experts.strict_yaml import DuplicateKeyError, load_strict


def problems_of(data: dict, zoo_root=None):
    with pytest.raises(SpecError) as info:
        spec = parse_spec(data)
        if zoo_root is not None:  # checkpoint checks need a zoo
            problems = check_spec(spec, zoo_root)
            if problems:
                raise SpecError(problems)
    return info.value.problems


def only_problem(data: dict, **kw):
    problems = problems_of(data, **kw)
    assert len(problems) == 1, [str(p) for p in problems]
    p = problems[0]
    assert p.fix, f"problem without a fix: {p}"
    return p


def test_default_spec_is_valid(default_spec):
    assert default_spec.name == "pcb-aoi"
    assert len([e for e in default_spec.experts if e.task == "classify"]) >= 10
    assert default_spec.router_expert.labels == [c.name for c in default_spec.categories]
    assert check_spec(default_spec) == []


def test_several_categories_share_an_expert(default_spec):
    sharing = [c.name for c in default_spec.categories if c.experts == ["diode_defect"]]
    assert sharing == ["diode", "led"]


def test_unknown_expert_in_table(spec_data):
    spec_data["categories"][0]["experts"] = ["no_such_expert"]
    p = only_problem(spec_data)
    assert p.field == "categories[0].experts[0]" and "no_such_expert" in p.message and "define it" in p.fix


def test_unknown_expert_in_dependency(spec_data):
    spec_data["dependencies"][0]["downstream"] = "polarty"
    p = only_problem(spec_data)
    assert p.field == "dependencies[0].downstream" and "polarty" in p.message


def test_unknown_trigger_label(spec_data):
    spec_data["dependencies"][0]["on_labels"] = ["fine"]
    p = only_problem(spec_data)
    assert p.field == "dependencies[0].on_labels" and "fine" in p.message and "ok" in p.fix


def test_unknown_category_in_rule(spec_data):
    spec_data["gating_rules"][0]["force_category"] = "bga"
    p = only_problem(spec_data)
    assert p.field == "gating_rules[0].force_category" and "bga" in p.message


def test_duplicate_expert_name(spec_data):
    spec_data["experts"][2]["name"] = "chip_defect"  # sot23_defect renamed onto chip_defect
    problems = problems_of(spec_data)
    assert any(p.field == "experts[1].name" and "duplicate" in p.message for p in problems)


def test_duplicate_category(spec_data):
    spec_data["categories"][1]["name"] = "chip_resistor"
    problems = problems_of(spec_data)
    assert any(p.field == "categories[0].name" and "duplicate" in p.message for p in problems)


def test_dependency_cycle(spec_data):
    spec_data["dependencies"].append({"upstream": "polarity", "on_labels": ["reversed_polarity"], "downstream": "soic_defect"})
    p = only_problem(spec_data)
    assert "cycle" in p.message and "soic_defect" in p.message and "DAG" in p.fix


def test_self_dependency(spec_data):
    spec_data["dependencies"].append({"upstream": "polarity", "on_labels": ["correct"], "downstream": "polarity"})
    problems = problems_of(spec_data)
    assert any("depends on itself" in p.message for p in problems)


def test_unreached_expert(spec_data):
    spec_data["categories"][8]["experts"] = ["chip_defect"]  # nothing routes to connector_defect any more
    p = only_problem(spec_data)
    assert p.field == "experts[7]" and "connector_defect" in p.message and "reached by no category" in p.message


def test_probabilities_must_sum_to_one(spec_data):
    spec_data["categories"][0]["probability"] = 0.5
    p = only_problem(spec_data)
    assert p.field == "categories[*].probability" and "sum to 1.2" in p.message and "rescale" in p.fix


def test_probability_out_of_range(spec_data):
    spec_data["categories"][0]["probability"] = 1.5
    problems = problems_of(spec_data)
    assert problems[0].field == "categories[0].probability"


def test_missing_checkpoints(spec_data, tmp_path):
    problems = problems_of(spec_data, zoo_root=tmp_path)
    assert len(problems) == len(spec_data["experts"])
    assert problems[0].field == "experts[0].checkpoint" and "zoo build" in problems[0].fix


def test_field_errors_name_field_and_fix(spec_data):
    bad_labels = {**spec_data["experts"][1], "pass_labels": ["fine"]}
    p = only_problem({**spec_data, "experts": [spec_data["experts"][0], bad_labels] + spec_data["experts"][2:]})
    assert p.field == "experts[1]" and "['fine'] are not in labels" in p.message and "add them to labels" in p.fix

    spec_data["experts"][1]["archtecture"] = {}
    del spec_data["router"]
    fields = {p.field: p for p in problems_of(spec_data)}
    assert fields["experts[1].archtecture"].fix.startswith("remove this key")
    assert fields["router"].fix == "add this field"


def test_router_labels_must_be_categories(spec_data):
    spec_data["experts"][0]["labels"] = spec_data["experts"][0]["labels"][:-1]
    p = only_problem(spec_data)
    assert p.field == "router.expert" and "differ from the categories" in p.message


def test_cli_spec_check_exit_codes(spec_data, tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(spec_data))
    assert main(["spec", "check", str(good), "--skip-checkpoints"]) == 0
    assert "OK" in capsys.readouterr().out

    spec_data["categories"][0]["experts"] = ["ghost"]
    spec_data["categories"][0]["probability"] = 0.9
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_data))
    assert main(["spec", "check", str(bad), "--skip-checkpoints"]) == CLI_EXIT_CODE
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "categories[0].experts[0]" in err and "fix:" in err

    assert main(["spec", "check", str(good), "--zoo", str(tmp_path)]) == CLI_EXIT_CODE
    assert "experts[0].checkpoint" in capsys.readouterr().err

    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    assert main(["spec", "check", str(tmp_path / "broken.yaml")]) == CLI_EXIT_CODE
    assert "<yaml>" in capsys.readouterr().err
    assert main(["spec", "check", str(tmp_path / "absent.yaml")]) == CLI_EXIT_CODE


def test_load_spec_default_path():
    assert load_spec().name == "pcb-aoi"


def test_a_key_given_twice_is_refused_with_its_lines(spec_data, tmp_path, capsys):
    """Plain YAML keeps the last of two equal keys silently; `spec check` names both lines and the fix."""
    text = yaml.safe_dump(spec_data, sort_keys=False)
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("name:"))
    twice = "\n".join(lines[: at + 1] + [lines[at]] + lines[at + 1:]) + "\n"
    path = tmp_path / "twice.yaml"
    path.write_text(twice)
    assert main(["spec", "check", str(path), "--skip-checkpoints"]) == CLI_EXIT_CODE
    err = capsys.readouterr().err
    assert f"the key 'name' is given twice (lines {at + 1} and {at + 2})" in err and "keep one of them" in err
    with pytest.raises(SpecError):
        load_spec(path)


def test_strict_yaml_keeps_what_plain_yaml_accepts():
    text = "a: 1\nb: {x: 1}\nbase: &k {p: 1}\nd:\n  <<: *k\n  q: 2\nlist: [1, 1]\n"
    assert load_strict(text) == yaml.safe_load(text)
    with pytest.raises(DuplicateKeyError) as info:
        load_strict("a: 1\nb:\n  x: 1\n  x: 2\n")
    assert (info.value.key, info.value.first_line, info.value.line) == ("x", 3, 4)
