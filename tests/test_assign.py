"""Assign (router/assign.py, pure): the replica that finishes an expert call first."""

from __future__ import annotations

import pytest

from expertmesh.router.assign import ExpertCost, ReplicaSnapshot, choose_replica, predicted_ms

COSTS = {"a": ExpertCost(k_ms_per_item=1.0, b_ms=10.0, switch_ms=50.0),
         "b": ExpertCost(k_ms_per_item=2.0, b_ms=5.0, switch_ms=200.0)}


def test_a_resident_expert_beats_a_switch_on_an_idle_replica():
    idle = ReplicaSnapshot("idle")
    holding = ReplicaSnapshot("holding", queued={"b": 4}, resident=frozenset({"a"}))
    assert predicted_ms(idle, "a", 2, COSTS) == pytest.approx(2 + 10 + 50)
    assert predicted_ms(holding, "a", 2, COSTS) == pytest.approx((2 * 4 + 5) + (2 + 10))
    assert choose_replica([idle, holding], "a", 2, COSTS) == "holding"


def test_calls_join_a_batch_already_queued_for_their_expert():
    queued = ReplicaSnapshot("q", queued={"a": 8})  # not resident yet, but its load is already paid for
    assert predicted_ms(queued, "a", 2, COSTS) == pytest.approx(10 * 1 + 10)


def test_a_long_queue_sends_calls_elsewhere_despite_a_switch():
    busy = ReplicaSnapshot("busy", queued={"b": 200}, resident=frozenset({"a"}))
    idle = ReplicaSnapshot("idle")
    assert choose_replica([busy, idle], "a", 1, COSTS) == "idle"


def test_ties_go_to_the_first_replica_and_none_without_replicas():
    assert choose_replica([ReplicaSnapshot("x"), ReplicaSnapshot("y")], "b", 3, COSTS) == "x"
    assert choose_replica([], "a", 1, COSTS) is None
