"""Which host runs a call (router.locality, pure): the expert's home host, else a stable surviving one."""

from __future__ import annotations

from expertmesh.router.locality import host_for

HOMES = {"a": "node-1", "b": "node-0", "c": "node-0"}
HOSTS = {"node-0", "node-1", "node-2"}


def test_a_call_goes_to_its_experts_home_host():
    assert host_for("a", HOMES, HOSTS) == "node-1"
    assert host_for("b", HOMES, HOSTS, alive={"node-0", "node-1", "node-2"}) == "node-0"


def test_without_a_placement_the_single_host_runs_everything():
    assert host_for("a", {}, {""}) == ""
    assert host_for("a", {}, {""}, alive={"whatever"}) == ""  # the unpinned host is not tied to a node


def test_a_lost_home_sends_the_call_to_one_stable_surviving_host():
    alive = {"node-0", "node-2"}
    first = host_for("a", HOMES, HOSTS, alive=alive)
    assert first in alive and all(host_for("a", HOMES, HOSTS, alive=alive) == first for _ in range(5))
    assert host_for("a", HOMES, HOSTS, lost={"node-1"}) in {"node-0", "node-2"}  # the router saw its host die


def test_an_expert_without_a_home_or_a_deployed_host_still_finds_one():
    assert host_for("z", HOMES, HOSTS) in HOSTS
    assert host_for("a", HOMES, {"node-0"}) == "node-0"  # node-1's host is not deployed (yet, or any more)


def test_no_usable_host_is_none():
    assert host_for("a", HOMES, HOSTS, alive=set()) is None
    assert host_for("a", HOMES, set()) is None


def test_a_dedicated_expert_goes_to_its_own_deployment_first_and_to_a_pool_when_its_nodes_are_gone():
    own = {"a": {"node-1": "Expert-a-node-1", "node-2": "Expert-a-node-2"}}
    assert host_for("a", HOMES, HOSTS, dedicated=own) == "Expert-a-node-1"  # on its home node
    assert host_for("b", HOMES, HOSTS, dedicated=own) == "node-0"  # the others: their pools as before
    assert host_for("a", HOMES, HOSTS, alive={"node-0", "node-2"}, dedicated=own) == "Expert-a-node-2"
    assert host_for("a", HOMES, HOSTS, lost={"Expert-a-node-1"}, dedicated=own) == "Expert-a-node-2"
    fallback = host_for("a", HOMES, HOSTS, alive={"node-0"}, dedicated=own)
    assert fallback == "node-0"  # no node with its own deployment lives: a pool loads it


def test_a_dependent_call_stays_on_its_upstreams_node_when_the_plan_holds_its_expert_there():
    homes = {"fine": "node-0", "chip": "node-2"}
    assert host_for("fine", homes, HOSTS, near="node-2", held_on={"node-0", "node-2"}) == "node-2"
    assert host_for("fine", homes, HOSTS, near="node-1", held_on={"node-0", "node-2"}) == "node-0"  # not held there
    assert host_for("fine", homes, HOSTS, near="node-2", held_on={"node-0", "node-2"},
                    alive={"node-0", "node-1"}) == "node-0"  # its upstream's node is gone
    own = {"chip": {"node-1": "Expert-chip-node-1", "node-2": "Expert-chip-node-2"}}
    assert host_for("chip", homes, HOSTS, dedicated=own, near="node-1") == "Expert-chip-node-1"
