"""The per-node memory model (cluster.memory_model, pure, no Ray): executors, budgets, tiers and the predicted calls/s
and switches/s from the simulator running the pooled host's own code; and how a plan carries it to the hosts."""

from __future__ import annotations

import json

import pytest
import yaml

from expertmesh.cli import main
from expertmesh.cluster.costs import ExpertCost
from expertmesh.cluster.memory_model import NodeMemory, node_requests, plan_node, predict, sim_experts
from expertmesh.experts.tiering import warm_plan

MIB = 2 ** 20


def expert(name: str, weights_mib: float, calls_per_s: float, *, act_mib: float = 2.0, k_ms: float = 2.0,
           switch_ms: float = 20.0) -> ExpertCost:
    return ExpertCost(name=name, weights_bytes=int(weights_mib * MIB), activation_bytes=int(act_mib * MIB),
                      k_ms_per_item=k_ms, b_ms_per_batch=4.0, batch_size=8, switch_ms=switch_ms,
                      disk_switch_ms=5 * switch_ms, calls_per_s=calls_per_s)


def zipf(n: int, total_calls_per_s: float, weights_mib: float = 10) -> list[ExpertCost]:
    w = [1 / (i + 1) for i in range(n)]
    return [expert(f"e{i}", weights_mib, total_calls_per_s * x / sum(w)) for i, x in enumerate(w)]


def test_a_node_that_holds_every_expert_starts_them_all_on_the_device_and_predicts_no_switch():
    experts = zipf(6, 30.0)
    p = plan_node(experts, {}, NodeMemory(100 * MIB, 100 * MIB, compute_slots=1))
    assert set(p.resident) == {e.name for e in experts} and not p.host and not p.on_demand
    assert p.predicted_switches_per_s == 0 and p.hit_share == 1.0 and p.num_replicas == 1
    assert p.device_budget_bytes + p.activation_reserve_bytes == 100 * MIB  # one batch's room, the rest experts


def test_when_memory_is_short_the_tiers_split_and_the_prediction_says_what_it_costs():
    """The same experts on a third of the memory: the most used stay on the device, the next ones in host memory,
    the rest load from disk on demand; the simulated node sustains fewer calls and switches."""
    experts = zipf(6, 30.0)
    roomy = plan_node(experts, {}, NodeMemory(100 * MIB, 100 * MIB, compute_slots=1))
    short = plan_node(experts, {}, NodeMemory(32 * MIB, 20 * MIB, compute_slots=1))
    assert short.resident == ("e0", "e1", "e2") and short.host == ("e3", "e4") and short.on_demand == ("e5",)
    assert short.predicted_switches_per_s > 0 and short.predicted_calls_per_s < roomy.predicted_calls_per_s
    assert 0 < short.hit_share < 1
    # the tiers are the pooled host's own warm-up for those budgets (one rule for planning and serving)
    same = warm_plan([e.name for e in experts], {e.name: e.weights_bytes for e in experts},
                     {e.name: e.calls_per_s for e in experts}, device_budget_bytes=short.device_budget_bytes,
                     host_budget_bytes=short.host_budget_bytes)
    assert same.device == short.resident and tuple(e for e in same.host if e not in same.device) == short.host


def test_more_executors_when_the_node_has_cores_and_the_demand_needs_them():
    experts = zipf(4, 600.0, weights_mib=5)  # 2.5 ms a call at batch 8: 1.5 replica-seconds per second
    one_core = plan_node(experts, {}, NodeMemory(200 * MIB, 200 * MIB, compute_slots=1))
    four = plan_node(experts, {}, NodeMemory(200 * MIB, 200 * MIB, compute_slots=4))
    assert one_core.num_replicas == 1 and len(one_core.options) == 1
    assert four.num_replicas > 1 and four.predicted_calls_per_s > one_core.predicted_calls_per_s
    assert len(four.options) == 4 and "predicted by executors (simulated)" in four.reason
    light = plan_node(zipf(4, 10.0, weights_mib=5), {}, NodeMemory(200 * MIB, 200 * MIB, compute_slots=4))
    assert light.num_replicas == 1  # the fewest that sustain twice the planned calls


def test_an_executor_count_whose_share_cannot_hold_the_largest_expert_is_never_picked():
    experts = [expert("big", 40, 10.0), expert("small", 5, 10.0)]
    p = plan_node(experts, {}, NodeMemory(60 * MIB, 60 * MIB, compute_slots=4))
    assert p.num_replicas == 1 and [o["num_replicas"] for o in p.options] == [1]
    assert predict(experts, {}, NodeMemory(60 * MIB, 60 * MIB, compute_slots=4), 2) is None
    too_big = plan_node([expert("huge", 100, 1.0)], {}, NodeMemory(64 * MIB, 64 * MIB, compute_slots=1))
    assert too_big.num_replicas == 1 and "cannot serve huge here" in too_big.reason


def test_the_nodes_requests_follow_the_dependency_edges():
    """An edge at half the upstream's calls triggers its downstream on about half of the upstream's requests, and the
    downstream's own entry rate is what the upstream does not make."""
    experts = [expert("up", 1, 10.0), expert("det", 1, 5.0)]
    sims = sim_experts(experts, {("up", "det"): 5.0})
    assert sims["det"].upstreams == frozenset({"up"}) and sims["up"].triggers == (("det", 0.5),)
    reqs = node_requests(sims, {"up": 10.0, "det": 0.0}, 2000, None)
    share = sum(r.chain == ("up", "det") for r in reqs) / len(reqs)
    assert share == pytest.approx(0.5, abs=0.05) and all(r.chain[0] == "up" for r in reqs)


def test_a_plans_executor_sizing_reaches_the_host_deployments(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"replicas": {"chip_defect": ["node-1"], "polarity": ["node-0", "node-1"]},
                                "executors": {"node-1": {"num_replicas": 2, "device_budget_bytes": 5 * MIB,
                                                         "host_budget_bytes": 7 * MIB, "resident": ["chip_defect"],
                                                         "host": ["polarity"], "reason": "test"}}}))
    out = tmp_path / "serve.yaml"
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out), "--plan", str(plan)]) == 0
    by_name = {d["name"]: d for d in yaml.safe_load(out.read_text())["applications"][0]["deployments"]}
    sized, plain = by_name["Host-node-1"], by_name["Host-node-0"]
    assert sized["autoscaling_config"]["min_replicas"] == sized["autoscaling_config"]["max_replicas"] == 2
    assert sized["user_config"]["device_budget_bytes"] == 5 * MIB and sized["user_config"]["host_budget_bytes"] == 7 * MIB
    assert sized["user_config"]["warm"] == {"device": ["chip_defect"], "host": ["polarity"]}
    assert "device_budget_bytes" not in plain["user_config"]  # not sized: the node's memory, as before
