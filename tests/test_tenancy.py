"""Several CoEs on one cluster, the pure parts: which CoE a factory gets, and experts shared by checkpoint. No Ray."""

from __future__ import annotations

import pytest
import yaml

from expertmesh.deployments.auth import TokenTable
from expertmesh.deployments.tenancy import CoETable, resolve
from expertmesh.errors import InvalidArgument, NotFound, PermissionDenied
from expertmesh.experts.revisions import serving_keys

SERVED = ["pcb-aoi", "power-boards"]


def table(data: dict) -> CoETable:
    return CoETable.from_mapping(data)


def test_without_a_coes_section_every_factory_gets_the_first_and_may_use_all():
    t = CoETable()
    assert resolve(t, "factory-a", "", SERVED) == "pcb-aoi"
    assert resolve(t, "factory-a", "power-boards", SERVED) == "power-boards"


def test_a_factory_gets_its_default_and_only_what_it_is_allowed():
    t = table({"default": {"allow": ["pcb-aoi"]}, "factory-b": {"allow": SERVED, "use": "power-boards"}})
    assert resolve(t, "factory-b", "", SERVED) == "power-boards"
    assert resolve(t, "factory-b", "pcb-aoi", SERVED) == "pcb-aoi"
    assert resolve(t, "factory-a", "", SERVED) == "pcb-aoi"
    with pytest.raises(PermissionDenied, match="may not use CoE 'power-boards'") as e:
        resolve(t, "factory-a", "power-boards", SERVED)
    assert e.value.field == "coe" and "pcb-aoi" in e.value.fix
    with pytest.raises(NotFound, match="no CoE named 'nope'") as e:
        resolve(t, "factory-b", "nope", SERVED, field="components[3].coe")
    assert e.value.field == "components[3].coe" and "power-boards" in e.value.fix
    with pytest.raises(PermissionDenied, match="none of the CoEs"):
        resolve(table({"default": {"allow": []}}), "factory-c", "", SERVED)


def test_tokens_file_coes_section_is_checked(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"tokens": {"a" * 20: "factory-a"},
                                    "coes": {"factory-a": {"allow": ["pcb-aoi"], "use": "power-boards"}}}))
    with pytest.raises(InvalidArgument, match="use 'power-boards' is not in allow") as e:
        TokenTable.load(path)
    assert e.value.field == "coes.factory-a"
    path.write_text(yaml.safe_dump({"tokens": {"a" * 20: "factory-a"}, "coes": {"factory-a": {"use": "x"}}}))
    t = TokenTable.load(path)
    assert t.coes.of("factory-a").use == "x" and t.coes.unknown_names(SERVED) == ["x"]


def test_an_expert_of_another_coe_with_the_same_checkpoint_shares_the_served_one():
    base = {"component_classifier": "c1", "general_defect": "g1", "polarity": "p1"}
    other = {"component_classifier": "c1", "lite_inspector": "g1", "polarity": "p2"}
    keys = serving_keys(base, other)
    assert keys == {"component_classifier": "component_classifier", "lite_inspector": "general_defect",
                    "polarity": "polarity@p2"}
    twice = serving_keys(base, {"a": "g1", "b": "g1"})  # one revision naming one checkpoint twice: only one shares
    assert sorted(twice.values()) == ["b@g1", "general_defect"]
