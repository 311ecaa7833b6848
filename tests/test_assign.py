"""Assign (router/assign.py, pure): the replica that finishes an expert call first."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from expertmesh.deployments.assign_router import AssignRequestRouter, calls_of
from expertmesh.router.assign import DEFAULT_COST, ExpertCost, ReplicaSnapshot, choose_replica, predicted_ms, rank_replicas
from expertmesh.router.plan import Call, Reason

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


def test_a_batch_of_calls_goes_where_its_experts_are_resident_unless_the_queue_there_costs_more():
    costs = {"a": ExpertCost(1.0, 2.0, 50.0), "b": ExpertCost(1.0, 2.0, 50.0)}
    holds_both = ReplicaSnapshot("r0", queued={}, resident=frozenset({"a", "b"}))
    holds_none = ReplicaSnapshot("r1", queued={}, resident=frozenset())
    assert rank_replicas([holds_none, holds_both], {"a": 3, "b": 1}, costs) == ["r0", "r1"]
    busy = ReplicaSnapshot("r0", queued={"c": 200}, resident=frozenset({"a", "b"}))
    assert rank_replicas([busy, holds_none], {"a": 3, "b": 1}, costs) == ["r1", "r0"]  # 200 queued calls of c: worse


def test_unknown_experts_get_the_default_cost_and_an_empty_batch_keeps_the_order():
    r0, r1 = ReplicaSnapshot("r0", queued={"x": 5}), ReplicaSnapshot("r1")
    assert rank_replicas([r0, r1], {"x": 1}, {}) == ["r0", "r1"]  # joins x's queued batch: no switch there
    assert rank_replicas([r0, r1], {}, {}) == ["r1", "r0"]  # nothing to run: the shorter queue first
    assert DEFAULT_COST.switch_ms > 0


def test_the_serve_router_reads_the_calls_of_a_host_run_request():
    meta = SimpleNamespace(call_method="run", internal_request_id="1")
    plans = [([Call("a", Reason.TABLE), Call("b", Reason.TABLE)], []), ([Call("a", Reason.TABLE)], ["x"])]
    assert calls_of(SimpleNamespace(metadata=meta, args=[{}, plans])) == {"a": 2, "b": 1}
    assert calls_of(SimpleNamespace(metadata=SimpleNamespace(call_method="stats"), args=[])) == {}
    assert calls_of(SimpleNamespace(metadata=meta, args=[{}, "not plans"])) == {}
    assert calls_of(None) == {}


class _Id:
    def __init__(self, unique_id: str) -> None:
        self.unique_id = unique_id


def test_the_serve_router_ranks_replicas_counts_its_calls_in_flight_and_backs_off():
    """Serve retries routing at once, without backing off, while a router leaves should_backoff False."""
    router = AssignRequestRouter.__new__(AssignRequestRouter)  # the pure parts; Serve builds the rest
    router.initialize_state(costs={"a": [1.0, 2.0, 50.0]})
    r0, r1 = _Id("r0"), _Id("r1")
    replicas = [SimpleNamespace(replica_id=r0, routing_stats={}),
                SimpleNamespace(replica_id=r1, routing_stats={"resident": ["a"]})]

    def request(rid: str, n: int):
        return SimpleNamespace(metadata=SimpleNamespace(call_method="run", internal_request_id=rid),
                               args=[{}, [([Call("a", Reason.TABLE)], [])] * n],
                               routing_context=SimpleNamespace(should_backoff=False))

    first = request("1", 1)
    ranks = asyncio.run(router.choose_replicas(replicas, first))
    assert first.routing_context.should_backoff
    assert [rank[0].replica_id.unique_id for rank in ranks] == ["r1", "r0"]  # resident there: no switch
    router.on_request_routed(request("2", 200), r1, None)  # 200 calls of a in flight on r1
    assert [rank[0].replica_id.unique_id for rank in asyncio.run(router.choose_replicas(replicas, request("3", 1)))] \
        == ["r0", "r1"]
    router.on_request_completed(r1, "2")
    assert [rank[0].replica_id.unique_id for rank in asyncio.run(router.choose_replicas(replicas, request("4", 1)))] \
        == ["r1", "r0"]
