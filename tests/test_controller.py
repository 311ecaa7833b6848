"""The placement controller's decision path without Ray: fake cluster readings, usage watch, planner, apply
and metrics, and an injected clock. Node loss and join re-plan at the next poll, each with its own
`replans_total{reason}` label and with the usage the running plan assumed; lasting drift re-plans with the
observed usage after the hold time, at most once per minimum interval; a re-plan that fails to apply is
decided and tried again on the next poll."""

from __future__ import annotations

import pytest

from expertmesh.cluster.controller import PlacementController, Poll, alive_nodes, next_step
from expertmesh.cluster.observed import UsageWatch
from expertmesh.cluster.placement import Plan
from expertmesh.cluster.replan import ReplanConfig, ReplanKind, ReplanState
from expertmesh.profiler.store import EdgeWeight, UsageProfile

POLL_S = 2.0
USAGE = UsageProfile(source="spec", num_requests=0, usage={"clf": 1.0, "chip": 0.8, "qfp": 0.2},
                     edges=[EdgeWeight(upstream="clf", downstream="chip", kind="route", probability=0.8),
                            EdgeWeight(upstream="clf", downstream="qfp", kind="route", probability=0.2)])
SWITCHED = ({"clf": 1.0, "chip": 0.1, "qfp": 0.9}, 500)  # the line switched products: drift 0.35
STEADY = ({"clf": 1.0, "chip": 0.8, "qfp": 0.2}, 500)
START = {"clf": ["node-0", "node-1", "node-2"], "chip": ["node-1"], "qfp": ["node-2"]}


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Metrics:
    def __init__(self) -> None:
        self.counters: dict[tuple, float] = {}
        self.gauges: dict[tuple, float] = {}
        self.observed: list[tuple[str, float]] = []

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        key = (name, *sorted(tags.items()))
        self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, name: str, value: float, **tags: str) -> None:
        self.gauges[(name, *sorted(tags.items()))] = value

    def observe(self, name: str, value: float, **tags: str) -> None:
        self.observed.append((name, value))

    def replans(self) -> dict[str, float]:
        return {dict(k[1:])["reason"]: v for k, v in self.counters.items() if k[0] == "expertmesh_replans_total"}


class Watch:
    def __init__(self) -> None:
        self.observed: tuple[dict[str, float], int] | None = None

    def poll(self):
        return self.observed


class Cluster:
    """What `describe()` would read: every node alive and offering 100 MiB unless changed."""

    def __init__(self) -> None:
        self.nodes = {n: {"name": n, "alive": True, "memory_mib": 100} for n in ("node-0", "node-1", "node-2")}

    def __call__(self) -> dict:
        return {"nodes": [dict(n) for n in self.nodes.values()], "replicas": {}}


def fake_plan(usage: UsageProfile, cluster: dict, current: dict[str, list[str]]) -> Plan:
    """clf on every alive node; each other expert stays where it was when its node is alive, else the first node;
    each node's pool sized to its memory (the executors a memory model would give)."""
    alive = sorted(alive_nodes(cluster))
    replicas = {"clf": alive}
    for expert in ("chip", "qfp"):
        kept = [n for n in current.get(expert, []) if n in alive]
        replicas[expert] = kept or alive[:1]
    moved = [e for e, ns in replicas.items() if set(ns) - set(current.get(e, []))]
    executors = {n["name"]: {"num_replicas": 1, "device_budget_bytes": int(n["memory_mib"] * 2**20)}
                 for n in cluster["nodes"] if n["alive"] and n["memory_mib"] > 0}
    return Plan(homes={e: ns[0] for e, ns in replicas.items()}, replicas=replicas, memory_used_bytes={}, load={},
                cut_edges=[], cut_weight=0.0, total_weight=1.0, method="fake", moved=moved, executors=executors)


class Harness:
    def __init__(self, config: ReplanConfig | None = None) -> None:
        self.clock, self.metrics, self.watch, self.cluster = Clock(), Metrics(), Watch(), Cluster()
        self.applied: list[dict[str, list[str]]] = []
        self.applied_executors: list[dict[str, dict]] = []
        self.planned_with: list[UsageProfile] = []
        self.fail_applies = 0
        self.lines: list[str] = []
        self.controller = PlacementController(
            "unused", demand=None, usage=USAGE, requests_per_s=10.0, current=START, apply=self.apply,
            poll_s=POLL_S, config=config, watch=self.watch, log=self.lines.append, read_cluster=self.cluster,
            planner=self.plan, clock=self.clock, metrics=self.metrics)

    def plan(self, usage, cluster, current):
        self.planned_with.append(usage)
        return fake_plan(usage, cluster, current)

    def apply(self, placement, executors):
        if self.fail_applies:
            self.fail_applies -= 1
            raise RuntimeError("Serve said DEPLOY_FAILED")
        self.applied.append(placement)
        self.applied_executors.append(executors)

    def poll(self):
        """One poll, POLL_S after the last."""
        self.clock.now_s += POLL_S
        return self.controller.poll_once()

    def polls_until_replan(self, limit_s: float = 600.0) -> float:
        """Seconds of polling until a re-plan is made."""
        start = self.clock.now_s
        while self.clock.now_s - start < limit_s:
            if self.poll() is not None:
                return self.clock.now_s - start
        raise AssertionError(f"no re-plan within {limit_s} s")


def test_a_quiet_cluster_is_left_alone():
    h = Harness()
    h.watch.observed = STEADY
    for _ in range(100):
        assert h.poll() is None
    assert not h.applied and not h.metrics.replans()
    assert h.metrics.gauges[("expertmesh_placement_planned_replicas", ("expert", "chip"), ("node", "node-1"))] == 1


def test_node_loss_replans_at_the_next_poll_with_the_planned_usage():
    h = Harness()
    h.watch.observed = SWITCHED  # drift is seen too, but a node change plans with what the running plan assumed
    h.cluster.nodes["node-2"]["alive"] = False
    step = h.poll()
    assert step.kind is ReplanKind.NODE_LOST and step.label == "node_lost" and step.reason == "node lost: node-2"
    assert h.planned_with == [USAGE]
    assert h.applied == [{"clf": ["node-0", "node-1"], "chip": ["node-1"], "qfp": ["node-0"]}]
    assert h.metrics.replans() == {"node_lost": 1}
    assert [name for name, _ in h.metrics.observed] == ["expertmesh_replan_seconds"]
    retired = ("expertmesh_placement_planned_replicas", ("expert", "qfp"), ("node", "node-2"))
    assert h.metrics.gauges[retired] == 0
    assert h.lines[0] == "re-planning: node lost: node-2"
    assert h.lines[1].startswith("re-planned and applied in ") and "moved qfp" in h.lines[1]
    assert h.controller.state.planned_nodes == {"node-0", "node-1"}
    assert h.controller.state.planned_usage == USAGE.usage and h.controller.usage is USAGE
    assert h.poll() is None  # planned for the live nodes now


def test_node_join_replans_and_a_node_without_expert_memory_is_not_a_join():
    h = Harness()
    h.cluster.nodes["head"] = {"name": "head", "alive": True, "memory_mib": 0}  # offers experts nothing
    assert h.poll() is None
    h.cluster.nodes["node-3"] = {"name": "node-3", "alive": True, "memory_mib": 100}
    step = h.poll()
    assert step.kind is ReplanKind.NODE_JOINED and step.reason == "node joined: node-3"
    assert h.metrics.replans() == {"node_joined": 1}
    assert h.applied[-1]["clf"] == ["node-0", "node-1", "node-2", "node-3"]


def test_loss_and_join_in_one_poll_is_its_own_kind():
    h = Harness()
    h.cluster.nodes["node-1"]["alive"] = False
    h.cluster.nodes["node-3"] = {"name": "node-3", "alive": True, "memory_mib": 100}
    step = h.poll()
    assert step.kind is ReplanKind.NODE_LOST_AND_JOINED and step.reason == "node lost: node-1; node joined: node-3"
    assert h.metrics.replans() == {"node_lost_and_joined": 1}
    assert h.planned_with == [USAGE]


def test_lasting_drift_replans_with_the_observed_usage_after_the_hold_time():
    h = Harness()
    h.clock.now_s += 60  # the controller started a minute ago: min_interval_s has passed
    h.watch.observed = SWITCHED
    waited_s = h.polls_until_replan()
    assert 30 <= waited_s <= 30 + POLL_S  # README: drift_hold_s 30 s, seen within one poll
    step_usage = h.planned_with[-1]
    assert h.metrics.replans() == {"drift": 1}
    assert step_usage.source == "traces" and step_usage.num_requests == 500
    assert step_usage.usage == SWITCHED[0]
    assert {(e.upstream, e.downstream): e.probability for e in step_usage.edges} == pytest.approx(
        {("clf", "chip"): 0.1, ("clf", "qfp"): 0.9})  # edges rescaled to the observed rates
    assert h.controller.usage is step_usage and h.controller.state.planned_usage == SWITCHED[0]
    for _ in range(100):  # the plan now assumes the observed mix: no more re-plans
        assert h.poll() is None
    assert h.metrics.replans() == {"drift": 1}


def test_drift_waits_for_the_minimum_interval_after_any_plan():
    h = Harness()
    h.watch.observed = SWITCHED
    h.cluster.nodes["node-2"]["alive"] = False
    assert h.poll().kind is ReplanKind.NODE_LOST  # a plan at t0 (with the planned usage)
    waited_s = h.polls_until_replan()
    assert 60 - POLL_S <= waited_s <= 60 + POLL_S  # README: min_interval_s 60 s
    assert h.metrics.replans() == {"node_lost": 1, "drift": 1}


def test_a_failed_apply_is_decided_and_tried_again_on_the_next_poll():
    h = Harness()
    h.fail_applies = 1
    h.cluster.nodes["node-2"]["alive"] = False
    with pytest.raises(RuntimeError, match="DEPLOY_FAILED"):
        h.poll()
    assert not h.applied and not h.metrics.replans() and h.controller.placement == START
    assert h.controller.state.planned_nodes == {"node-0", "node-1", "node-2"}  # as before: not applied
    step = h.poll()
    assert step.kind is ReplanKind.NODE_LOST
    assert len(h.applied) == 1 and h.metrics.replans() == {"node_lost": 1}
    assert h.poll() is None


def test_the_loop_logs_a_failed_poll_and_keeps_polling():
    h = Harness()
    h.controller.poll_s = 0  # stop_event.wait(0) returns at once
    h.fail_applies = 1
    h.cluster.nodes["node-2"]["alive"] = False
    reads = {"n": 0}
    read = h.controller.read_cluster

    def read_and_stop_after_two():
        reads["n"] += 1
        if reads["n"] == 2:
            h.controller.stop_event.set()
        return read()

    h.controller.read_cluster = read_and_stop_after_two
    h.controller.run()  # in this thread: returns once stopped
    assert any(ln.startswith("placement controller: RuntimeError: Serve said DEPLOY_FAILED") for ln in h.lines)
    assert "placement controller: polls work again" in h.lines
    assert h.metrics.replans() == {"node_lost": 1} and len(h.applied) == 1


def test_a_failure_that_repeats_is_logged_once_not_at_every_poll():
    """The issue's log: "FailedPrecondition: memory: ..." twice a second, forever. A poll that keeps failing the same
    way is logged once; a new error is logged; the recovery once."""
    h = Harness()
    h.controller.poll_s = 0
    reads = {"n": 0}

    def failing_read():
        reads["n"] += 1
        if reads["n"] == 50:
            h.controller.stop_event.set()
        if reads["n"] < 20:
            raise RuntimeError("the GCS is away")
        if reads["n"] < 30:
            raise TimeoutError("the dashboard is slow")
        return Cluster()()

    h.controller.read_cluster = failing_read
    h.controller.run()
    assert [ln.split(" (")[0] for ln in h.lines] == ["placement controller: RuntimeError: the GCS is away",
                                                    "placement controller: TimeoutError: the dashboard is slow",
                                                    "placement controller: polls work again"]


def test_a_node_whose_memory_shrinks_gets_a_degraded_plan_at_the_next_poll_and_then_quiet():
    """A budget cut on a node it keeps: the next poll re-plans (memory_changed) with the usage the plan assumed, the new
    executors are applied even though no expert moves, and the controller is quiet once it is applied."""
    h = Harness()
    assert h.poll() is None  # the first reading is what the running plan was made for
    h.cluster.nodes["node-1"]["memory_mib"] = 40
    step = h.poll()
    assert step.kind is ReplanKind.MEMORY_CHANGED and step.reason == "memory changed: node-1 100.0 -> 40.0 MiB"
    assert h.planned_with == [USAGE] and h.metrics.replans() == {"memory_changed": 1}
    assert h.applied_executors[-1]["node-1"]["device_budget_bytes"] == 40 * 2**20
    assert h.applied[-1] == START  # nothing moved, the pools were resized
    lines = len(h.lines)
    for _ in range(50):
        assert h.poll() is None
    assert len(h.lines) == lines  # quiet once applied


def test_next_step_keeps_the_state_until_the_plan_is_applied():
    state = ReplanState(planned_nodes=frozenset({"a", "b"}), planned_usage=USAGE.usage, last_plan_s=0.0)
    step, kept = next_step(ReplanConfig(), state, USAGE, Poll(1.0, frozenset({"a"}), SWITCHED))
    assert kept is state and step.applied_state.planned_nodes == {"a"} and step.applied_state.last_plan_s == 1.0
    assert step.usage is USAGE and step.applied_state.planned_usage == USAGE.usage
    step, kept = next_step(ReplanConfig(), state, USAGE, Poll(1.0, frozenset({"a", "b"}), SWITCHED))
    assert step is None and kept.drift_since_s == 1.0  # pending drift is kept whether or not anything is applied


def test_the_controller_polls_and_watches_as_the_readme_says():
    h = Harness()
    assert PlacementController.__init__.__kwdefaults__["poll_s"] == POLL_S == 2.0  # README: every 2 s
    watch = UsageWatch(lambda: [], {"clf"})
    assert (watch.window_s, watch.min_requests) == (60.0, 50)  # README: a 60 s window, never on fewer than 50
    assert h.controller.config == ReplanConfig()


def test_an_expert_the_placement_does_not_hold_is_placed_at_the_next_poll():
    """The app now serves an expert the running placement lacks (a CoE added to the config, an expert retrained into
    a new version): the next poll re-plans (experts_changed), and once it is placed the controller is quiet again."""
    h = Harness()
    h.controller.served = frozenset({"clf", "chip", "qfp"})
    h.controller.placement = {e: ns for e, ns in START.items() if e != "qfp"}
    step = h.poll()
    assert step is not None and step.kind is ReplanKind.EXPERTS_CHANGED and "qfp" in step.reason
    assert h.applied[-1]["qfp"] and h.metrics.replans() == {"experts_changed": 1}
    assert h.poll() is None
