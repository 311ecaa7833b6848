"""The placement planner on generated graphs: capacity, optimality on small instances, determinism, errors."""

from __future__ import annotations

import random

import pytest

from expertmesh.cluster.demand import placement_problem
from expertmesh.cluster.explain import format_plan
from expertmesh.cluster.placement import (Edge, ExpertDemand, NodeCapacity, PlacementConfig, PlacementProblem,
                                          brute_force_cut, optimality_gap, plan)
from expertmesh.errors import FailedPrecondition, InvalidArgument
from expertmesh.profiler.usage import from_spec
from test_profiler import _profile

MIB = 2 ** 20


def generated(seed: int, num_experts: int = 7, num_nodes: int = 3, mem_per_node_mib: int = 60,
              replicas: bool = True) -> PlacementProblem:
    """A router plus `num_experts` experts in chains and shared downstreams, random sizes and weights."""
    rng = random.Random(seed)
    experts = [ExpertDemand(name="router", memory_bytes=5 * MIB, load=1.0, everywhere=True)]
    experts += [ExpertDemand(name=f"e{i}", memory_bytes=rng.randint(5, 20) * MIB, load=rng.uniform(0.1, 1.0))
                for i in range(num_experts)]
    edges = [Edge(upstream="router", downstream=f"e{i}", weight=rng.uniform(0.5, 3)) for i in range(num_experts // 2)]
    for i in range(num_experts // 2, num_experts):  # each later expert depends on one or two earlier ones
        for up in rng.sample(range(i), k=min(i, rng.randint(1, 2))):
            edges.append(Edge(upstream=f"e{up}", downstream=f"e{i}", weight=rng.uniform(0.05, 2)))
    nodes = [NodeCapacity(name=f"n{i}", memory_bytes=mem_per_node_mib * MIB) for i in range(num_nodes)]
    return PlacementProblem(experts=experts, nodes=nodes, edges=edges,
                            config=PlacementConfig(allow_replicas=replicas, balance_slack=1.0))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_capacity_is_never_exceeded(seed, method):
    problem = generated(seed)
    result = plan(problem, method)
    caps = {n.name: n.memory_bytes for n in problem.nodes}
    mem = {e.name: e.memory_bytes for e in problem.experts}
    for node, used in result.memory_used_bytes.items():
        assert used <= caps[node]
        assert used == sum(mem[e] for e, ns in result.replicas.items() if node in ns)
    assert all(result.homes[e] in result.replicas[e] for e in result.homes)
    assert set(result.replicas["router"]) == set(caps)  # needed by every request: on every node


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_load_balance_bound_holds(seed, method):
    """README: a node's load is at most (1 + balance_slack) x the mean plus the largest expert (every-node experts
    excluded); the plan's per-node load is the sum of its home experts' loads."""
    problem = generated(seed)
    result = plan(problem, method)
    movable = {e.name: e.load for e in problem.experts if not e.everywhere}
    bound = (1 + problem.config.balance_slack) * sum(movable.values()) / len(problem.nodes) + max(movable.values())
    for node, load in result.load.items():
        assert load == pytest.approx(sum(movable[e] for e, h in result.homes.items() if h == node and e in movable))
        assert load <= bound + 1e-9, (node, load, bound)
    assert sum(result.load.values()) == pytest.approx(sum(movable.values()))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_cut_edges_are_the_calls_that_leave_a_node(seed, method):
    """README: a call leaves node n when the upstream's home is n and the downstream has no replica there; calls
    from an every-node expert never leave; the cut weight and the share inside a node follow from that."""
    problem = generated(seed, mem_per_node_mib=55)  # tight: most of these plans cut a call or two
    result = plan(problem, method)
    everywhere = {e.name for e in problem.experts if e.everywhere}
    expected = sorted((e.upstream, e.downstream, result.homes[e.upstream], e.weight) for e in problem.edges
                      if e.upstream not in everywhere and result.homes[e.upstream] not in result.replicas[e.downstream])
    assert [c[:3] for c in sorted(result.cut_edges)] == [c[:3] for c in expected]
    assert [c[3] for c in sorted(result.cut_edges)] == pytest.approx([c[3] for c in expected])
    total = sum(e.weight for e in problem.edges if e.upstream not in everywhere)
    assert result.total_weight == pytest.approx(total)
    assert result.cut_weight == pytest.approx(sum(c[3] for c in expected))
    assert result.internal_share == pytest.approx(1 - result.cut_weight / total)


@pytest.mark.parametrize("seed", range(6))
def test_exact_is_optimal_on_small_instances(seed):
    problem = generated(seed, num_experts=5, num_nodes=3, mem_per_node_mib=40, replicas=False)
    assert plan(problem, "exact").cut_weight == pytest.approx(brute_force_cut(problem), abs=1e-6)


def test_known_answer_dependents_share_a_node():
    """Two independent chains that each fill half a node: each chain on its own node, nothing cut."""
    experts = [ExpertDemand(name=n, memory_bytes=10 * MIB, load=1.0) for n in ("a", "a2", "b", "b2")]
    edges = [Edge(upstream="a", downstream="a2", weight=5.0), Edge(upstream="b", downstream="b2", weight=3.0)]
    nodes = [NodeCapacity(name=f"n{i}", memory_bytes=20 * MIB) for i in range(2)]
    result = plan(PlacementProblem(experts=experts, nodes=nodes, edges=edges))
    assert result.cut_weight == 0 and result.homes["a"] == result.homes["a2"] != result.homes["b"] == result.homes["b2"]


def test_shared_downstream_is_replicated_next_to_its_upstreams():
    experts = [ExpertDemand(name=n, memory_bytes=10 * MIB, load=1.0) for n in ("u1", "u2", "shared")]
    edges = [Edge(upstream="u1", downstream="shared", weight=1.0), Edge(upstream="u2", downstream="shared", weight=1.0)]
    nodes = [NodeCapacity(name=f"n{i}", memory_bytes=20 * MIB) for i in range(2)]
    problem = PlacementProblem(experts=experts, nodes=nodes, edges=edges, config=PlacementConfig(balance_slack=0.0))
    result = plan(problem)
    assert result.cut_weight == 0 and len(result.replicas["shared"]) == 2
    no_replicas = plan(problem.model_copy(update={"config": PlacementConfig(allow_replicas=False, balance_slack=0.0)}))
    assert no_replicas.cut_weight == 1.0  # one of the two upstreams must call across


@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_the_same_inputs_give_the_same_plan(method):
    a, b = plan(generated(3), method), plan(generated(3), method)
    assert (a.homes, a.replicas, a.cut_edges) == (b.homes, b.replicas, b.cut_edges)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_a_replan_after_node_loss_moves_only_what_it_must(seed, method):
    """Re-planning with the running placement as `current`: the lost node's experts move; an expert on a surviving
    node stays put unless moving it cuts less (the exact planner: never more cut than planning from scratch)."""
    problem = generated(seed, num_nodes=3, mem_per_node_mib=90)
    before = plan(problem, method)
    survivors = [n for n in problem.nodes if n.name != "n2"]
    lost = {e for e, ns in before.replicas.items() if ns == ["n2"]}  # only there: they must move
    again = problem.model_copy(update={"nodes": survivors, "current": before.replicas})
    after = plan(again, method)
    scratch = plan(problem.model_copy(update={"nodes": survivors}), method)
    assert set(after.moved) >= lost
    if method == "exact":
        assert after.cut_weight == pytest.approx(scratch.cut_weight, abs=1e-6)
        stayed = [e for e in before.replicas if e not in lost]
        rehomed = sum(after.homes[e] != before.homes[e] for e in stayed)
        assert rehomed <= sum(scratch.homes[e] != before.homes[e] for e in stayed)
    assert "router" not in after.moved  # it was on every node: losing one starts nothing new
    assert all(n != "n2" for ns in after.replicas.values() for n in ns)


# README (Placement planner, Method): the heuristic's cut above the exact optimum, as a share of all dependency
# weight, on 8 generated instances (seeds 0-7, 3 nodes of 60 MiB): (mean, instances at 0, worst), as rounded there.
README_GAPS = {7: (0.10, 5, 0.31), 9: (0.10, 2, 0.28)}


@pytest.mark.parametrize("num_experts", sorted(README_GAPS))
def test_heuristic_gap_on_instances_with_a_known_answer(num_experts):
    gaps = [optimality_gap(generated(seed, num_experts=num_experts))[2] for seed in range(8)]
    assert all(g >= -1e-9 for g in gaps), gaps  # never better than the optimum
    mean, num_zero, worst = README_GAPS[num_experts]
    assert round(sum(gaps) / len(gaps), 2) == mean, gaps
    assert sum(g <= 1e-9 for g in gaps) == num_zero, gaps
    assert round(max(gaps), 2) == worst, gaps


def test_an_expert_larger_than_any_node_is_a_clear_error():
    problem = generated(0)
    big = problem.model_copy(update={"experts": problem.experts + [ExpertDemand(name="huge", memory_bytes=10**12)]})
    with pytest.raises(FailedPrecondition, match="'huge' needs .* more than any node's device offers .* cannot be "
                                                 "served at all") as info:
        plan(big)
    assert "add a node with more memory" in info.value.fix


@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_when_memory_is_short_the_plan_degrades_instead_of_failing(method):
    """The issue's bug: the planner assumed every expert resident and refused a cluster whose memory is short
    ("the experts need more memory than all nodes together"), so a node loss on a full cluster was never re-planned.
    Now every expert gets a home whose pool can load it, the devices hold what fits (never more), and the homes off
    the device are named - the plan is degraded, not refused."""
    p = generated(0, mem_per_node_mib=25)
    one = p.model_copy(update={"nodes": p.nodes[:1]})
    result = plan(one, method)
    mem = {e.name: e.memory_bytes for e in p.experts}
    movable = {e.name for e in p.experts if not e.everywhere}
    assert set(result.homes) == set(mem) and result.offloaded["n0"]
    held = sum(mem[e] for e in movable if e not in result.offloaded["n0"])
    assert held + mem["router"] == result.memory_used_bytes["n0"] <= one.nodes[0].memory_bytes
    assert sum(mem[e] for e in movable) > one.nodes[0].memory_bytes  # it really was short
    assert all("device memory is short" in result.reasons[e] for e in result.offloaded["n0"])


@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_off_the_device_go_the_experts_whose_switches_cost_least_per_byte(method):
    """Two experts compete for one device: the one whose misses cost less per byte leaves it."""
    experts = [ExpertDemand(name="hot_small", memory_bytes=10 * MIB, load=1.0, miss_cost=5.0),
               ExpertDemand(name="cold_big", memory_bytes=30 * MIB, load=0.1, miss_cost=1.0),
               ExpertDemand(name="warm", memory_bytes=10 * MIB, load=0.5, miss_cost=2.0)]
    p = PlacementProblem(experts=experts, nodes=[NodeCapacity(name="n0", memory_bytes=35 * MIB)], edges=[],
                         config=PlacementConfig(balance_slack=1.0))
    result = plan(p, method)
    assert result.offloaded == {"n0": ["cold_big"]} and result.memory_used_bytes["n0"] == 20 * MIB
    assert result.miss_cost == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_a_node_loss_on_a_full_cluster_is_planned_and_moves_only_what_it_must(method):
    """Plan on 3 nodes filled to the brim, lose one: the re-plan (with the running placement as `current`) succeeds,
    the survivors keep what they held, and the lost node's experts land on them, off the device where needed."""
    p = generated(1, num_experts=9, mem_per_node_mib=40)
    before = plan(p, method)
    lost = "n2"
    survivors = [n for n in p.nodes if n.name != lost]
    after = plan(p.model_copy(update={"nodes": survivors, "current": before.replicas}), method)
    assert all(lost not in ns for ns in after.replicas.values())
    kept = [e for e, ns in before.replicas.items() if before.homes[e] != lost and e != "router"]
    assert all(after.homes[e] == before.homes[e] for e in kept), (before.homes, after.homes)
    for node in survivors:
        assert after.memory_used_bytes[node.name] <= node.memory_bytes
    assert sum(len(v) for v in after.offloaded.values()) >= 1  # 9 experts no longer fit two devices


def test_infeasible_and_malformed_inputs_are_clear_errors():
    p = generated(0, mem_per_node_mib=25)
    with pytest.raises(InvalidArgument, match="unknown expert 'ghost'"):
        plan(p.model_copy(update={"edges": p.edges + [Edge(upstream="e0", downstream="ghost", weight=1)]}))
    with pytest.raises(InvalidArgument, match="no nodes"):
        plan(p.model_copy(update={"nodes": []}))
    with pytest.raises(InvalidArgument, match="unknown method 'fastest'"):
        plan(generated(0), "fastest")


@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_a_node_too_small_for_any_expert_gets_none(method):
    """A node whose memory the every-node experts (the router's classifier) already take is given no expert: its pool
    could load none."""
    p = generated(0)
    small = NodeCapacity(name="tiny", memory_bytes=4 * MIB)  # the router alone needs 5 MiB
    result = plan(p.model_copy(update={"nodes": p.nodes + [small]}), method)
    assert not [e for e, ns in result.replicas.items() if "tiny" in ns and e != "router"]


def test_the_default_coe_plans_with_its_profile_shape(default_spec):
    """Synthetic profiles of the real spec: every dependency stays inside a node when memory allows, and the
    default CoE on 3 nodes is small enough to be solved exactly (README: `plan (exact)`)."""
    profiles = {e.name: _profile(expert=e.name) for e in default_spec.experts}
    nodes = [NodeCapacity(name=f"node-{i}", memory_bytes=64_000) for i in range(3)]
    problem = placement_problem(default_spec, profiles, from_spec(default_spec), nodes, requests_per_s=20)
    result = plan(problem)
    assert result.cut_weight == 0 and result.total_weight > 0 and result.method == "exact"
    assert set(result.replicas["component_classifier"]) == {n.name for n in nodes}
    text = format_plan(result, problem)
    assert "component_classifier" in text and "why:" in text
    with pytest.raises(FailedPrecondition, match="no current profile for"):
        placement_problem(default_spec, {}, from_spec(default_spec), nodes, 20)
