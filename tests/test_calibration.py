"""`expertmesh zoo calibrate`: the pure choices (experts/calibration.py) on hand-made numbers, and one run of the
command on the tiny zoo."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from expertmesh.experts import calibration as cal
from expertmesh.experts.spec import load_spec, parse_spec
from expertmesh.router.plan import ExpertOutput

from conftest import default_spec_data, tiny_spec_data


def _row(**scores: float) -> dict[str, float]:
    return dict(scores)


# --------------------------------------------------------------------------- the table
def test_best_expert_per_category_wins():
    options = {"a": [("x",), ("y",)], "b": [("x",), ("y",)]}
    scores = {"a": _row(x=0.90, y=0.99), "b": _row(x=0.97, y=0.80)}
    costs = {"x": 1.0, "y": 1.0}
    chosen = cal.choose_table(scores, options, costs, {"a": ("x",), "b": ("y",)})
    assert chosen["a"].option == ("y",) and chosen["a"].reason == "best"
    assert chosen["b"].option == ("x",) and chosen["b"].score == pytest.approx(0.97)


def test_tie_within_tolerance_goes_to_the_cheaper():
    options = {"a": [("big",), ("small",)]}
    costs = {"big": 2.0, "small": 1.0}
    # 0.4 points apart: tied at the default tolerance (0.5 points), so the cheaper one wins although it scores lower
    chosen = cal.choose_table({"a": _row(big=0.990, small=0.986)}, options, costs, {"a": ("big",)})["a"]
    assert chosen.option == ("small",) and chosen.reason.startswith("tie:") and "cheaper" in chosen.reason
    # 1 point apart: not a tie
    assert cal.choose_table({"a": _row(big=0.99, small=0.98)}, options, costs, {"a": ("small",)})["a"].option == ("big",)
    # equal costs (within 10 %): the higher score, then the current entry
    even = {"big": 1.05, "small": 1.0}
    assert cal.choose_table({"a": _row(big=0.990, small=0.986)}, options, even, {"a": ("small",)})["a"].option == ("big",)
    tie = cal.choose_table({"a": _row(big=0.99, small=0.99)}, options, even, {"a": ("small",)})["a"]
    assert tie.option == ("small",) and tie.reason == "tie: kept current"


def test_multi_expert_option_costs_its_sum_and_unmeasured_category_keeps_its_entry():
    options = {"a": [("x",), ("x", "y")], "b": [("x",)]}
    costs = {"x": 1.0, "y": 1.0}
    scores = {"a": {"x": 0.95, "x+y": 0.953}, "b": {"x": math.nan}}
    chosen = cal.choose_table(scores, options, costs, {"a": ("x", "y"), "b": ("x",)})
    assert chosen["a"].option == ("x",) and chosen["a"].cost == 1.0  # the pair is tied and twice the cost
    assert chosen["b"].option == ("x",) and chosen["b"].reason == "kept: not measured"


# --------------------------------------------------------------------------- the threshold
def test_threshold_is_the_smallest_reaching_the_target():
    pairs = [(0.30, False), (0.40, True), (0.50, False), (0.60, True), (0.70, True), (0.80, True), (0.90, True),
             (0.95, True), (0.97, True), (0.99, True)]
    t = cal.threshold_for_target(pairs, 0.10)
    # at 0.40: 1 wrong of 9 (0.111); at 0.50: 1 of 8 (0.125); at 0.60: 0 of 7
    assert t.threshold == 0.60 and t.wrong_route_rate == 0.0 and t.fallback_rate == pytest.approx(0.3) and t.reachable
    t = cal.threshold_for_target(pairs, 0.12)
    assert t.threshold == 0.40 and t.wrong_route_rate == pytest.approx(1 / 9) and t.fallback_rate == pytest.approx(0.1)
    everything = cal.threshold_for_target(pairs, 0.5)  # all accepted: the lowest observed score, nothing falls back
    assert everything.threshold == 0.30 and everything.fallback_rate == 0.0
    assert cal.rates_at(pairs, 0.60) == (0.0, pytest.approx(0.3))


def test_unreachable_target_is_flagged_with_the_lowest_rate():
    pairs = [(0.5, True), (0.6, True), (0.9, False), (0.99, False)]  # the most confident are wrong
    t = cal.threshold_for_target(pairs, 0.2)
    assert not t.reachable
    assert t.lowest_rate == pytest.approx(0.5) and t.threshold == 0.5  # the smallest threshold of the lowest rate
    tied = cal.threshold_for_target([(1.0, True), (1.0, False), (0.2, True)], 0.0)  # equal scores are one threshold
    assert not tied.reachable and tied.lowest_rate == pytest.approx(1 / 3) and tied.threshold == 0.2
    with pytest.raises(ValueError):
        cal.threshold_for_target([], 0.1)


# --------------------------------------------------------------------------- candidates, scores, the new spec
def test_candidates_are_experts_whose_labels_judge_the_category(default_spec):
    opts = cal.candidate_options(default_spec)
    names = {c: {o[0] for o in os if len(o) == 1} for c, os in opts.items()}
    assert "chip_defect" not in names["soic"]  # its training never saw reversed polarity
    assert "general_defect" not in names["soic"]  # nor the fallback's (polarity is left to the polarity expert)
    assert {"soic_defect", "electrolytic_defect", "diode_defect"} <= names["soic"]
    assert {"chip_defect", "qfp_defect", "soic_defect", "general_defect"} <= names["chip_resistor"]
    assert all("polarity" not in n and "solder_fine" not in n for n in names.values())  # judge one aspect only


def test_scores_follow_dependency_triggers_and_aggregate(default_spec):
    # two soic images, both reversed (defects): soic_defect says ok on both, polarity catches only the first
    outputs = {"soic_defect": [ExpertOutput("soic_defect", "ok", 0.9)] * 2,
               "polarity": [ExpertOutput("polarity", "reversed_polarity", 0.9), ExpertOutput("polarity", "correct", 0.9)],
               "general_defect": [ExpertOutput("general_defect", "misaligned", 0.9)] * 2}
    scores = cal.score_options(default_spec, {"soic": [("soic_defect",), ("general_defect",)]}, outputs,
                               {"soic": [0, 1]}, [True, True])
    assert scores == {"soic": {"soic_defect": 0.5, "general_defect": 1.0}}


def test_calibrated_spec_data_raises_version_and_drops_unreached_experts():
    data = default_spec_data()
    table = {c["name"]: tuple(c["experts"]) for c in data["categories"]}
    table["sot23"] = ("chip_defect",)
    th = cal.ThresholdChoice(0.73, 0.004, 0.02, True, 0.0)
    new, dropped = cal.calibrated_spec_data(data, table, th)
    assert dropped == ["sot23_defect"] and data["version"] == 1  # the input is not touched
    spec = parse_spec(new)
    assert spec.version == 2 and spec.category("sot23").experts == ["chip_defect"]
    assert spec.router.min_confidence == 0.73 and spec.router.expected_fallback_probability == 0.02
    assert all("sot23_defect" not in (d.upstream, d.downstream) for d in spec.dependencies)
    for e in data["experts"]:  # a spec that leaves `task` to its default: the same experts dropped, the router kept
        e.pop("task")
    assert cal.calibrated_spec_data(data, table, th)[1] == ["sot23_defect"]


# --------------------------------------------------------------------------- the command, on the tiny zoo
def test_calibrate_command_on_the_tiny_zoo(tiny_zoo, tmp_path, capsys):
    from expertmesh.cli import main

    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_data(), sort_keys=False))
    out, report = tmp_path / "tiny.v2.yaml", tmp_path / "calibration.json"
    args = ["zoo", "calibrate", "--spec", str(spec_file), "--zoo", str(tiny_zoo), "--no-progress", "--json", str(report)]
    assert main(args + ["--target-wrong-route", "0.9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verdict accuracy per category" in printed and "router.min_confidence" in printed
    r = json.loads(report.read_text())
    new = load_spec(out, zoo_root=tiny_zoo)
    old = load_spec(spec_file)
    assert new.version == old.version + 1 and spec_file.read_text() == yaml.safe_dump(tiny_spec_data(), sort_keys=False)
    # the table and the threshold are what the printed matrix and the router's scores imply
    options = cal.candidate_options(old)
    chosen = cal.choose_table(r["scores"], options, r["costs"], {c.name: tuple(c.experts) for c in old.categories})
    assert {c.name: tuple(c.experts) for c in new.categories} == {c: ch.option for c, ch in chosen.items()}
    for c, ch in chosen.items():
        assert f"{c:<24}" in printed and cal.option_name(ch.option) in printed
    th = cal.threshold_for_target([tuple(p) for p in r["router_pairs"]], 0.9)
    assert new.router.min_confidence == th.threshold == r["threshold"]["min_confidence"]
    assert r["cost_unit"] == "params"  # the tiny zoo has no profile
    # a target no threshold reaches: exit 2 naming the option, nothing written
    if r["threshold"]["lowest_wrong_route_rate"] > 0:
        out2 = tmp_path / "never.yaml"
        assert main(args + ["--target-wrong-route", "0", "--out", str(out2)]) == 2
        assert "--target-wrong-route" in capsys.readouterr().err and not out2.exists()
