"""Executor sizing (pure, no Ray): replicas and device budgets from profiled costs, and how a plan carries them."""

from __future__ import annotations

import json

import yaml

from expertmesh.cli import main
from expertmesh.cluster.sizing import ExpertCost, predict, size_executors

MIB = 2 ** 20


def expert(name: str, weights_mib: float, calls_per_s: float, *, act_mib: float = 2.0, k_ms: float = 2.0,
           switch_ms: float = 20.0) -> ExpertCost:
    return ExpertCost(name=name, weights_bytes=int(weights_mib * MIB), activation_bytes=int(act_mib * MIB),
                      k_ms_per_item=k_ms, b_ms_per_batch=4.0, batch_size=8, switch_ms=switch_ms, calls_per_s=calls_per_s)


def test_each_replica_keeps_room_for_a_batch_and_the_node_memory_is_never_exceeded():
    experts = [expert(f"e{i}", 10, 5.0) for i in range(6)]
    for r in (1, 2, 3):
        s = predict(experts, 64 * MIB, r, compute_slots=4)
        assert s is not None and s.activation_reserve_bytes == 2 * MIB
        assert r * (s.device_budget_bytes + s.activation_reserve_bytes) <= 64 * MIB
    assert predict(experts, 64 * MIB, 7, compute_slots=4) is None  # 64/7 - 2 MiB < the 10 MiB expert


def test_more_replicas_run_more_batches_until_switches_cost_more_than_they_give():
    # six experts of 10 MiB, 64 MiB: one replica holds all six (no switches); three hold two each (most calls switch)
    experts = [expert(f"e{i}", 10, 50.0, switch_ms=200.0) for i in range(6)]
    one, three = predict(experts, 64 * MIB, 1, 4), predict(experts, 64 * MIB, 3, 4)
    assert one.hit_share == 1.0 and three.hit_share < 0.5
    assert one.predicted_calls_per_s > three.predicted_calls_per_s  # switching eats the parallelism
    pick = size_executors(experts, 64 * MIB, compute_slots=4, max_replicas=4, headroom=100.0)  # no count covers it
    assert pick.num_replicas == 1 and "none covers" in pick.reason
    # cheap switches: parallel replicas win, and the fewest that cover the demand are taken
    cheap = [expert(f"e{i}", 10, 100.0, switch_ms=0.5) for i in range(6)]
    fastest = size_executors(cheap, 64 * MIB, compute_slots=4, max_replicas=4, headroom=100.0)
    assert fastest.num_replicas > 1
    enough = size_executors(cheap, 64 * MIB, compute_slots=4, max_replicas=4, headroom=1.0)  # 600 calls/s
    assert enough.num_replicas == 2 and "the fewest that cover" in enough.reason  # 1: 400/s, 2: 727/s
    assert size_executors(cheap, 64 * MIB, compute_slots=4, max_replicas=4, headroom=0.5).num_replicas == 1


def test_compute_slots_bound_the_gain_from_replicas():
    experts = [expert("a", 1, 10.0)]
    rates = [predict(experts, 64 * MIB, r, compute_slots=2).predicted_calls_per_s for r in (1, 2, 3)]
    assert rates[1] == 2 * rates[0] and rates[2] == rates[1]


def test_an_expert_too_large_for_the_node_gets_one_replica_with_the_reason():
    s = size_executors([expert("big", 100, 1.0)], 64 * MIB, compute_slots=4)
    assert s.num_replicas == 1 and "cannot hold the largest expert" in s.reason


def test_a_plans_executor_sizing_reaches_the_host_deployments(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"replicas": {"chip_defect": ["node-1"], "polarity": ["node-0", "node-1"]},
                                "executors": {"node-1": {"num_replicas": 2, "device_budget_bytes": 5 * MIB,
                                                         "reason": "test"}}}))
    out = tmp_path / "serve.yaml"
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out), "--plan", str(plan)]) == 0
    by_name = {d["name"]: d for d in yaml.safe_load(out.read_text())["applications"][0]["deployments"]}
    sized, plain = by_name["Host-node-1"], by_name["Host-node-0"]
    assert sized["autoscaling_config"]["min_replicas"] == sized["autoscaling_config"]["max_replicas"] == 2
    assert sized["user_config"]["device_budget_bytes"] == 5 * MIB
    assert "device_budget_bytes" not in plain["user_config"]  # not sized: the node's memory, as before
