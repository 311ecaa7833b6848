"""Where a plan runs (router.locality, pure): the node holding its first calls, or the front router itself."""

from __future__ import annotations

from expertmesh.router.locality import execution_node, plan_runner
from expertmesh.router.plan import Call, Reason

HOMES = {"a": "node-1", "b": "node-0", "c": "node-0"}
A = Call("a", Reason.TABLE, None)
B = Call("b", Reason.TABLE, None)
C = Call("c", Reason.RULE, "r")
EXECUTORS = {"node-0", "node-1"}


def test_the_plan_runs_on_the_node_that_holds_most_of_its_first_calls():
    assert execution_node([A], HOMES) == "node-1"
    assert execution_node([A, B, C], HOMES) == "node-0"  # most calls
    assert execution_node([A, B], HOMES) == "node-0"  # tie: the first node by name
    assert execution_node([Call("z", Reason.TABLE, None)], HOMES) is None


def test_a_lost_node_is_never_chosen():
    assert execution_node([A], HOMES, {"node-0"}) is None  # node-1 was lost: its executor is gone, run it here
    assert execution_node([A, B], HOMES, {"node-0"}) == "node-0"
    assert execution_node([A, B, C], HOMES, set()) is None


def test_plan_runner_hands_off_to_the_executor_of_the_chosen_node():
    assert plan_runner([A], HOMES, {"node-0", "node-1"}, EXECUTORS) == "node-1"
    assert plan_runner([A, B, C], HOMES, None, EXECUTORS) == "node-0"  # liveness not known yet: trust the placement


def test_plan_runner_runs_at_the_front_without_a_placement():
    assert plan_runner([A, B], {}, None, set()) is None
    assert plan_runner([A, B], {}, None, EXECUTORS) is None  # executors but no homes
    assert plan_runner([A, B], HOMES, None, set()) is None  # homes but no executors (single node)


def test_plan_runner_runs_at_the_front_when_the_node_is_lost():
    assert plan_runner([A], HOMES, {"node-0"}, EXECUTORS) is None
    assert plan_runner([A, B], HOMES, {"node-0"}, EXECUTORS) == "node-0"  # the surviving node still holds b


def test_plan_runner_runs_at_the_front_when_the_executor_is_gone():
    assert plan_runner([A], HOMES, {"node-0", "node-1"}, {"node-0"}) is None  # a re-plan removed node-1's executor
    assert plan_runner([Call("z", Reason.TABLE, None)], HOMES, None, EXECUTORS) is None  # no call has a home
