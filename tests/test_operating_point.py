"""Verdicts a line needs (issue 25 item 4): labels mean PASS, UNCERTAIN or DEFECT; an expert's operating point
(pass_min_probability) is chosen for a target defect recall; the escape and false-call rates and the confusion
matrix. Pure: no Ray, no models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmesh.errors import SpecError
from expertmesh.experts.line_figures import confusion_lines, line_figures
from expertmesh.experts.operating_point import choose_pass_min_probability, decide, flag_rates, pass_probability
from expertmesh.experts.spec import parse_spec
from expertmesh.router.plan import ExpertOutput, Verdict, aggregate

LABELS = ["ok", "suspect", "defective"]


def spec(**expert):
    return parse_spec({
        "name": "cells", "router": {"expert": "kind"},
        "experts": [{"name": "kind", "labels": ["mono", "poly"]},
                    {"name": "mono_cells", "labels": LABELS, "pass_labels": ["ok"], **expert},
                    {"name": "poly_cells", "labels": LABELS, "pass_labels": ["ok"], "uncertain_labels": ["suspect"]}],
        "categories": [{"name": "mono", "experts": ["mono_cells"], "probability": 0.5},
                       {"name": "poly", "experts": ["poly_cells", "mono_cells"], "probability": 0.5}]})


def test_a_label_means_pass_uncertain_or_defect():
    s = spec(uncertain_labels=["suspect"])
    out = lambda e, label: ExpertOutput(e, label, 0.9)  # noqa: E731
    assert aggregate(s, [out("mono_cells", "ok")]).verdict is Verdict.PASS
    u = aggregate(s, [out("mono_cells", "suspect")])
    assert (u.verdict, u.defect, u.decided_by) == (Verdict.UNCERTAIN, "suspect", "mono_cells")
    d = aggregate(s, [out("poly_cells", "suspect"), out("mono_cells", "defective")])
    assert (d.verdict, d.defect) == (Verdict.DEFECT, "defective")  # a defect outranks a person's look
    assert aggregate(spec(), [out("mono_cells", "suspect")]).verdict is Verdict.DEFECT  # not uncertain there


@pytest.mark.parametrize("fields,message", [
    ({"uncertain_labels": ["maybe"]}, "uncertain_labels ['maybe'] are not in labels"),
    ({"uncertain_labels": ["ok"]}, "in both pass_labels and uncertain_labels"),
    ({"pass_min_probability": 1.5}, "less than or equal to 1"),
])
def test_spec_refuses_bad_verdict_fields(fields, message):
    with pytest.raises(SpecError) as info:
        spec(**fields)
    assert message in str(info.value) and "fix" in str(info.value)


def test_decide_at_an_operating_point():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.45, 0.1, 0.45], [0.2, 0.7, 0.1]])
    mask = torch.tensor([True, False, False])
    idx, _ = decide(probs, mask, None)
    assert idx.tolist() == [0, 0, 1]  # argmax (the first of a tie)
    idx, score = decide(probs, mask, 0.5)
    assert idx.tolist() == [0, 2, 1] and score.tolist() == pytest.approx([0.6, 0.45, 0.7])
    assert decide(probs, mask, 0.0)[0].tolist() == [0, 0, 0]  # everything passes
    assert decide(probs, mask, 1.0)[0].tolist() == [1, 2, 1]  # nothing does


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [0.8, 0.95, 1.0])
def test_chosen_point_reaches_the_target_recall_with_the_fewest_false_calls(seed, target):
    """A seeded, imbalanced set of P(pass) scores shaped like a weak expert's: the chosen point reaches the target
    exactly on these images, and any lower point misses it."""
    rng = np.random.default_rng(seed)
    is_defect = rng.random(400) < 0.3
    p_pass = np.clip(np.where(is_defect, rng.beta(2, 3, 400), rng.beta(5, 2, 400)), 0, 1)
    point = choose_pass_min_probability(p_pass, is_defect, target)
    assert point.reached and point.defect_recall >= target
    recall, false_calls = flag_rates(p_pass < point.pass_min_probability, is_defect)
    assert (recall, false_calls) == (point.defect_recall, point.false_call_rate)
    lower = np.nextafter(point.pass_min_probability, -1.0)
    assert point.pass_min_probability == 0.0 or flag_rates(p_pass < lower, is_defect)[0] < target
    # served the same way: the expert's decision at that point flags exactly those images
    probs = torch.from_numpy(np.stack([p_pass, 1 - p_pass], axis=1))
    idx, _ = decide(probs, torch.tensor([True, False]), point.pass_min_probability)
    assert np.array_equal(idx.numpy() == 1, p_pass < point.pass_min_probability)


def test_unreachable_target_says_so():
    point = choose_pass_min_probability(np.array([0.9, 0.8]), np.array([True, False]), 1.0)
    assert point.reached and point.defect_recall == 1.0  # flag everything: reachable, at full false calls
    assert point.false_call_rate == 1.0
    assert choose_pass_min_probability(np.array([0.5]), np.array([False]), 0.9).defect_recall == 1.0


def test_pass_probability_adds_the_pass_labels():
    probs = np.array([[0.5, 0.2, 0.3]])
    assert pass_probability(probs, ["ok", "fine", "bad"], ["ok", "fine"]) == pytest.approx([0.7])


def test_line_figures_and_their_text():
    v = [Verdict.PASS, Verdict.DEFECT, Verdict.UNCERTAIN, Verdict.PASS, Verdict.DEFECT]
    f = line_figures(v, [False, False, True, True, True])
    assert f["escape_rate"] == pytest.approx(1 / 3) and f["false_call_rate"] == pytest.approx(0.5)
    assert f["confusion"] == {"good": {"PASS": 1, "UNCERTAIN": 0, "DEFECT": 1},
                              "defective": {"PASS": 1, "UNCERTAIN": 1, "DEFECT": 1}}
    text = "\n".join(confusion_lines(f))
    assert "escape rate (defects passed) 0.3333" in text and "false-call rate (good parts not passed) 0.5000" in text
    assert line_figures([], [])["escape_rate"] is None and confusion_lines({}) == []
