"""When to re-plan: node changes at once (each kind its own), drift only when it lasts, no flapping (pure,
injected clock). The tests run the default `ReplanConfig`, so they hold the figures README's Re-planning
section states: drift above 0.2 for 30 s, at most once per 60 s, cleared only below half the threshold."""

from __future__ import annotations

import pytest

from expertmesh.cluster.replan import ClusterSnapshot, ReplanConfig, ReplanKind, ReplanState, decide, usage_drift

NODES = frozenset({"node-0", "node-1", "node-2"})
BASE = {"a": 0.6, "b": 0.3, "c": 0.1}
SHIFTED = {"a": 0.1, "b": 0.3, "c": 0.6}  # drift 0.5
CFG = ReplanConfig()  # the defaults `expertmesh serve --replan` runs with
README = {"drift_threshold": 0.2, "drift_hold_s": 30.0, "min_interval_s": 60.0, "clear_ratio": 0.5}


def state(**kw) -> ReplanState:
    return ReplanState(**{"planned_nodes": NODES, "planned_usage": BASE, "last_plan_s": 0.0, **kw})


def mix_at(drift: float) -> dict[str, float]:
    """A usage whose total-variation distance from BASE is `drift` (mass moved from a to c)."""
    return {"a": 0.6 - drift, "b": 0.3, "c": 0.1 + drift}


def test_defaults_are_the_readme_figures():
    assert CFG.model_dump() == README
    with pytest.raises(ValueError, match="clear_ratio"):
        ReplanConfig(clear_ratio=1.0)  # a band of zero width would flap


def test_drift_is_total_variation():
    assert usage_drift(BASE, BASE) == 0
    assert usage_drift(BASE, SHIFTED) == pytest.approx(0.5)
    assert usage_drift(BASE, mix_at(0.15)) == pytest.approx(0.15)
    assert usage_drift({"a": 2.0}, {"a": 1.0}) == 0  # normalised


@pytest.mark.parametrize("alive, kind, reason", [
    (NODES - {"node-2"}, ReplanKind.NODE_LOST, "node lost: node-2"),
    (NODES | {"node-3"}, ReplanKind.NODE_JOINED, "node joined: node-3"),
    (NODES - {"node-2"} | {"node-3"}, ReplanKind.NODE_LOST_AND_JOINED, "node lost: node-2; node joined: node-3"),
])
def test_node_changes_replan_at_once_with_their_kind(alive, kind, reason):
    # even one second after the last plan and while drift is pending: node changes do not wait
    d, s = decide(CFG, state(last_plan_s=0.5, drift_since_s=0.9), ClusterSnapshot(1.0, alive, SHIFTED))
    assert d.replan and d.kind is kind and d.reason == reason and not kind.uses_observed_usage
    assert d.lost == NODES - alive and d.joined == alive - NODES
    # once applied: planned for the live nodes, at this time, still for the usage the running plan assumed
    assert s == ReplanState(planned_nodes=alive, planned_usage=BASE, last_plan_s=1.0)
    assert kind.value == kind.name.lower()  # the metric label


def test_drift_must_be_held_for_the_hold_time():
    s = state()
    d, s = decide(CFG, s, ClusterSnapshot(100.0, NODES, SHIFTED))
    assert not d.replan and d.reason == "drift pending" and s.drift_since_s == 100.0
    d, s = decide(CFG, s, ClusterSnapshot(129.9, NODES, SHIFTED))
    assert not d.replan  # held 29.9 s < 30 s
    d, s = decide(CFG, s, ClusterSnapshot(130.0, NODES, SHIFTED))
    assert d.kind is ReplanKind.DRIFT and d.kind.uses_observed_usage and d.reason == "traffic drift 0.50 for 30 s"
    assert s == ReplanState(planned_nodes=NODES, planned_usage=SHIFTED, last_plan_s=130.0)


def test_drift_replans_at_most_once_per_min_interval():
    s = ReplanState(NODES, BASE, last_plan_s=130.0)  # a plan was just applied
    d, s = decide(CFG, s, ClusterSnapshot(131.0, NODES, SHIFTED))
    d, s = decide(CFG, s, ClusterSnapshot(189.9, NODES, SHIFTED))
    assert not d.replan and d.reason == "drift pending"  # held 58.9 s, but only 59.9 s since the last plan
    d, _ = decide(CFG, s, ClusterSnapshot(190.0, NODES, SHIFTED))
    assert d.kind is ReplanKind.DRIFT  # 60 s since the last plan


@pytest.mark.parametrize("drift, replans", [(0.19, False), (0.2, True), (0.5, True)])
def test_the_drift_threshold(drift, replans):
    s = state()
    _, s = decide(CFG, s, ClusterSnapshot(100.0, NODES, mix_at(drift)))
    d, _ = decide(CFG, s, ClusterSnapshot(200.0, NODES, mix_at(drift)))
    assert d.replan is replans


def test_a_mix_hovering_at_the_threshold_does_not_flap():
    s = state(drift_since_s=50.0)
    d, s = decide(CFG, s, ClusterSnapshot(60.0, NODES, mix_at(0.15)))
    assert not d.replan and s.drift_since_s == 50.0  # inside the band (0.1 .. 0.2): pending drift kept
    d, s = decide(CFG, s, ClusterSnapshot(61.0, NODES, mix_at(0.11)))
    assert s.drift_since_s == 50.0  # still inside the band
    d, s = decide(CFG, s, ClusterSnapshot(62.0, NODES, mix_at(0.09)))
    assert not d.replan and s.drift_since_s is None  # cleared only below half the threshold
    replan_times = []
    for t in range(600):  # above the threshold and inside the band in turn, every 5 s, for 10 minutes
        usage = SHIFTED if (t // 5) % 2 == 0 else mix_at(0.15)
        d, s = decide(CFG, s, ClusterSnapshot(100.0 + t, NODES, usage))
        if d.replan:
            replan_times.append(100.0 + t)
            s = ReplanState(NODES, BASE, last_plan_s=100.0 + t)  # the plan it would apply still assumes BASE
    assert replan_times, "the band keeps drift pending: it is real drift and must re-plan"
    gaps = [b - a for a, b in zip([0.0] + replan_times, replan_times)]
    assert min(gaps) >= 60  # never more often than min_interval_s
    assert len(replan_times) <= 600 // 60


def test_no_observed_usage_is_no_drift():
    d, s = decide(CFG, state(drift_since_s=10.0), ClusterSnapshot(1000.0, NODES, {}))
    assert not d.replan and d.drift == 0 and s.drift_since_s is None


def test_experts_the_placement_does_not_hold_are_placed_at_once():
    """A CoE added to the app (or an expert retrained into a new version): its experts are not in the running
    placement, so the next poll re-plans, with the usage the plan assumed; a node change still comes first."""
    d, s = decide(CFG, state(), ClusterSnapshot(10.0, NODES, {}, frozenset({"lite_solder@1a2b3c4d"})))
    assert d.kind is ReplanKind.EXPERTS_CHANGED and "lite_solder@1a2b3c4d" in d.reason
    assert not d.kind.uses_observed_usage and s.planned_nodes == NODES
    d, _ = decide(CFG, state(), ClusterSnapshot(10.0, NODES - {"node-2"}, {}, frozenset({"x"})))
    assert d.kind is ReplanKind.NODE_LOST
