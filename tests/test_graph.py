"""The dependency graph and usage probabilities, on the default spec and a hand-computed small one."""

from __future__ import annotations

import pytest

from expertmesh.experts.graph import build_graph, dependency_order, invocation_probabilities, usage_probabilities
from expertmesh.experts.spec import parse_spec


def small_spec(fallback_p: float = 0.0):
    arch = {"family": "resnet", "config": {}}
    ex = lambda name, labels, task="classify": {"name": name, "task": task, "architecture": arch,  # noqa: E731
                                                "checkpoint": name, "input_size_px": 32, "labels": labels}
    return parse_spec({
        "name": "small",
        "router": {"expert": "r", "fallback_expert": "g", "expected_fallback_probability": fallback_p},
        "experts": [ex("r", ["a", "b"], "route"), ex("ea", ["ok", "x"]), ex("eb", ["ok", "x"]),
                    ex("shared", ["ok", "y"]), ex("g", ["ok", "bad"])],
        "categories": [{"name": "a", "experts": ["ea"], "probability": 0.25},
                       {"name": "b", "experts": ["eb"], "probability": 0.75}],
        "dependencies": [{"upstream": "ea", "on_labels": ["x"], "downstream": "shared", "trigger_probability": 0.4},
                         {"upstream": "eb", "on_labels": ["x"], "downstream": "shared", "trigger_probability": 0.2}],
    })


def test_graph_edges_carry_probabilities():
    g = build_graph(small_spec(0.1))
    assert g.edges["r", "ea"] == {"kind": "table", "probability": pytest.approx(0.9 * 0.25), "categories": ["a"]}
    assert g.edges["r", "g"]["kind"] == "fallback" and g.edges["r", "g"]["probability"] == 0.1
    assert g.edges["ea", "shared"]["probability"] == 0.4 and g.edges["ea", "shared"]["on_labels"] == ["x"]
    assert set(g.predecessors("shared")) == {"ea", "eb"}  # a shared downstream with two upstreams


def test_usage_probabilities_by_hand():
    u = usage_probabilities(small_spec())
    assert u["r"] == 1.0
    assert u["ea"] == pytest.approx(0.25) and u["eb"] == pytest.approx(0.75)
    assert u["shared"] == pytest.approx(0.25 * 0.4 + 0.75 * 0.2)
    assert u["g"] == 0.0


def test_fallback_share_reduces_table_usage():
    u = usage_probabilities(small_spec(0.2))
    assert u["ea"] == pytest.approx(0.8 * 0.25) and u["g"] == pytest.approx(0.2)


def test_independent_upstreams_combine():
    spec = small_spec()
    spec.categories[0].experts.append("eb")  # category a now calls both ea and eb
    p = invocation_probabilities(spec, "a")
    assert p["shared"] == pytest.approx(1 - (1 - 0.4) * (1 - 0.2))


def test_default_spec_graph(default_spec):
    g = build_graph(default_spec)
    assert set(g.predecessors("polarity")) == {"soic_defect", "electrolytic_defect", "diode_defect"}
    assert g.edges["component_classifier", "chip_defect"]["categories"] == ["chip_resistor", "chip_capacitor"]
    u = usage_probabilities(default_spec)
    assert u["chip_defect"] == pytest.approx(0.99 * 0.6)
    assert u["polarity"] == pytest.approx(0.99 * 0.22 * 0.95)
    order = dependency_order(default_spec)
    assert order[0] == "component_classifier"
    assert order.index("diode_defect") < order.index("polarity") and order.index("chip_defect") < order.index("solder_fine")


def test_longest_trigger_chain(default_spec):
    from expertmesh.experts.graph import longest_chain

    assert longest_chain(default_spec) == 1  # a defect expert -> polarity or solder_fine
    assert longest_chain(default_spec.model_copy(update={"dependencies": []})) == 0
    chained = default_spec.dependencies + [default_spec.dependencies[0].model_copy(
        update={"upstream": "polarity", "downstream": "general_defect", "on_labels": ["reversed_polarity"]})]
    assert longest_chain(default_spec.model_copy(update={"dependencies": chained})) == 2
