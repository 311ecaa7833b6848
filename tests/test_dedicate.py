"""Dedicated deployment or pool per expert (cluster.dedicate, pure, no Ray), and how a plan carries the choice."""

from __future__ import annotations

import json

import yaml

from expertmesh.cli import main
from expertmesh.cluster.dedicate import busy, split
from expertmesh.cluster.costs import ExpertCost
from expertmesh.deployments.config import host_deployments

MIB = 2 ** 20


def expert(name: str, calls_per_s: float, weights_mib: float = 10.0, act_mib: float = 2.0) -> ExpertCost:
    # 2 ms per item + 4 ms per batch of 8: 2.5 ms a call at the serving batch
    return ExpertCost(name=name, weights_bytes=int(weights_mib * MIB), activation_bytes=int(act_mib * MIB),
                      k_ms_per_item=2.0, b_ms_per_batch=4.0, batch_size=8, switch_ms=20.0, calls_per_s=calls_per_s)


def test_a_hot_expert_gets_its_own_replicas_and_the_pool_keeps_the_tail_on_what_is_left():
    hot, tail = expert("hot", 400.0), [expert(f"t{i}", 5.0) for i in range(4)]  # hot: 1.0 replica-s/s
    assert busy(hot) == 1.0 and busy(tail[0]) < 0.02
    s = split([*tail, hot], 100 * MIB, compute_slots=4)
    d = s.dedicated["hot"]
    assert (d.min_replicas, d.max_replicas) == (2, 3)  # at most half busy each; up to twice, within 4 - 1 slots
    assert d.device_budget_bytes == 10 * MIB and d.replica_bytes == 12 * MIB
    assert [e.name for e in s.pooled] == ["t0", "t1", "t2", "t3"]
    assert s.pool_memory_bytes == 100 * MIB - 3 * 12 * MIB and s.pool_compute_slots == 2
    assert "dedicated" in s.reasons["hot"] and s.reasons["t0"].startswith("pooled: its calls take")


def test_a_hot_expert_stays_pooled_when_its_replicas_would_starve_the_pool():
    hot, tail = expert("hot", 400.0), [expert("t", 5.0)]
    no_slot = split([hot, *tail], 100 * MIB, compute_slots=2)  # 2 replicas of its own leave the pool no slot
    assert not no_slot.dedicated and "no compute slot" in no_slot.reasons["hot"]
    no_room = split([hot, expert("big", 5.0, weights_mib=60)], 90 * MIB, compute_slots=8)
    assert not no_room.dedicated and "too little memory" in no_room.reasons["hot"]
    alone = split([hot], 30 * MIB, compute_slots=2)  # nothing else on the node: no pool to keep room for
    assert alone.dedicated["hot"].max_replicas == 2 and not alone.pooled
    assert not split([hot, *tail], 100 * MIB, compute_slots=4, min_busy=2.0).dedicated  # the threshold is a setting


def test_a_plans_dedicated_experts_become_their_own_pinned_autoscaled_deployments(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({
        "replicas": {"chip_defect": ["node-1"], "solder_fine": ["node-1"], "polarity": ["node-0"]},
        "executors": {"node-1": {"num_replicas": 1, "device_budget_bytes": 5 * MIB, "dedicated": {
            "chip_defect": {"min_replicas": 2, "max_replicas": 3, "device_budget_bytes": 3 * MIB, "reason": "hot"}}}}}))
    out = tmp_path / "serve.yaml"
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out), "--plan", str(plan)]) == 0
    by_name = {d["name"]: d for d in yaml.safe_load(out.read_text())["applications"][0]["deployments"]}
    own = by_name["Expert-chip_defect-node-1"]
    assert own["user_config"]["experts"] == ["chip_defect"] and own["user_config"]["device_budget_bytes"] == 3 * MIB
    assert (own["autoscaling_config"]["min_replicas"], own["autoscaling_config"]["max_replicas"]) == (2, 3)
    assert own["ray_actor_options"]["label_selector"] == {"expertmesh.io/node": "node-1"}
    assert by_name["Host-node-1"]["user_config"]["experts"] == ["solder_fine"]  # the pool keeps the rest
    routing = by_name["Router"]["user_config"]
    assert routing["dedicated"] == {"chip_defect": {"node-1": "Expert-chip_defect-node-1"}}
    assert routing["host_nodes"] == ["node-0", "node-1"] and routing["homes"]["chip_defect"] == "node-1"
    assert host_deployments(routing) == {"node-0": "Host-node-0", "node-1": "Host-node-1",  # what the router calls
                                         "Expert-chip_defect-node-1": "Expert-chip_defect-node-1"}


def test_a_plan_with_bad_dedicated_bounds_is_refused_with_the_fix(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"replicas": {"chip_defect": ["node-1"]}, "executors": {"node-1": {
        "num_replicas": 0, "device_budget_bytes": 0,
        "dedicated": {"chip_defect": {"min_replicas": 3, "max_replicas": 2, "device_budget_bytes": 1}}}}}))
    assert main(["config", "--zoo", str(tmp_path), "--out", str(tmp_path / "s.yaml"), "--plan", str(plan)]) != 0
    err = capsys.readouterr().err
    assert "max_replicas (2) is below min_replicas (3)" in err and "expertmesh plan --json" in err
