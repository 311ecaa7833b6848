"""Routing policy: table, fallback, gating rules, dependency triggers and verdict aggregation (no Ray)."""

from __future__ import annotations

from expertmesh.router.plan import ExpertOutput, Reason, RequestMeta, Verdict, aggregate, route, triggered_calls


def test_table_route(default_spec):
    r = route(default_spec, "led", 0.97)
    assert [(c.expert, c.reason) for c in r.calls] == [("diode_defect", Reason.TABLE)]
    assert not r.fallback and r.rules == ()


def test_low_confidence_goes_to_fallback(default_spec):
    r = route(default_spec, "led", 0.3)
    assert r.fallback and [(c.expert, c.reason) for c in r.calls] == [("general_defect", Reason.FALLBACK)]


def test_low_confidence_without_fallback_is_uncertain(default_spec):
    spec = default_spec.model_copy(update={"router": default_spec.router.model_copy(update={"fallback_expert": None})})
    r = route(spec, "led", 0.3)
    assert r.calls == () and aggregate(spec, []).verdict is Verdict.UNCERTAIN


def test_rule_forces_category(default_spec):
    r = route(default_spec, "soic", 0.99, RequestMeta(component_hint="qfp"))
    assert r.category == "qfp" and r.rules == ("cad_qfp",)
    assert [(c.expert, c.reason, c.because_of) for c in r.calls] == [("qfp_defect", Reason.RULE, "cad_qfp")]


def test_rule_adds_experts(default_spec):
    r = route(default_spec, "chip_resistor", 0.99, RequestMeta(station_id="wave-2"))
    assert [(c.expert, c.reason) for c in r.calls] == [("chip_defect", Reason.TABLE), ("solder_fine", Reason.RULE)]


def test_dependency_triggers_once(default_spec):
    planned = {"diode_defect"}
    calls = triggered_calls(default_spec, ExpertOutput("diode_defect", "ok", 0.9), planned)
    assert [(c.expert, c.reason, c.because_of) for c in calls] == [("polarity", Reason.DEPENDENCY, "diode_defect")]
    assert planned == {"diode_defect"}  # the caller's bookkeeping is its own
    assert triggered_calls(default_spec, ExpertOutput("diode_defect", "ok", 0.9), planned | {"polarity"}) == []
    assert triggered_calls(default_spec, ExpertOutput("diode_defect", "missing", 0.9), set()) == []


def test_aggregate(default_spec):
    agg = lambda *outs: aggregate(default_spec, [ExpertOutput(e, l, 0.9) for e, l in outs])  # noqa: E731
    assert agg(("chip_defect", "ok")).verdict is Verdict.PASS
    assert agg(("chip_defect", "missing")).defect == "missing"
    # a suspect defers to the fine expert: its "ok" clears the part, its defect decides
    assert agg(("chip_defect", "solder_suspect"), ("solder_fine", "ok")).verdict is Verdict.PASS
    o = agg(("chip_defect", "solder_suspect"), ("solder_fine", "solder_bridge"))
    assert (o.verdict, o.defect, o.decided_by) == (Verdict.DEFECT, "solder_bridge", "solder_fine")
    assert agg(("soic_defect", "ok"), ("polarity", "reversed_polarity")).defect == "reversed_polarity"
    assert agg(("soic_defect", "ok"), ("polarity", "correct")).verdict is Verdict.PASS
    assert agg(("general_defect", "defect")).verdict is Verdict.DEFECT
    assert agg().verdict is Verdict.UNCERTAIN
