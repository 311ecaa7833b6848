"""The placement controller: a pure step decides each poll; thin glue polls the cluster and applies plans.

`next_step(config, state, usage, poll)` is the decision path, pure and testable without Ray: given one
poll's reading (the clock, the nodes alive that offer experts memory, the observed usage), it asks
`cluster.replan.decide` whether to re-plan and returns a `ReplanStep`: its `ReplanKind` (which is the
`expertmesh_replans_total{reason}` label) and the usage to plan with (the observed usage for a drift
re-plan, the usage the running plan assumed for a node change), plus the policy state to keep until
that re-plan is applied. A re-plan that fails to plan or apply leaves the state as it was, so the next
poll decides (and tries) again.

`PlacementController` is the glue. Every `poll_s` (`poll_once`) it reads the cluster (`read_cluster`,
default `cluster.local.describe`: alive nodes and the memory each offers) and the `UsageWatch` (the experts'
invocation counters scraped from every node), takes the step, and on a re-plan plans again on the live
inventory (`planner`, default `plan_on_inventory`: `cluster.placement.plan` with the running placement as
`current`, so the planner moves only what it must, then each node's pooled hosts by the memory model,
`cluster.memory_model`) and hands the new placement and executors to `apply` (which redeploys the Serve app
with them). A smaller memory (a node lost, a budget cut) gives a degraded plan - experts off the device, in host
memory or on disk - never a refusal. Each decision is logged once and exported as metrics
(`expertmesh_replans_total{reason}`, `expertmesh_replan_seconds`, `expertmesh_placement_planned_replicas`); a
poll that fails is logged when its error is new, not at every poll, and the recovery once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from expertmesh.cluster.dedicate import DEFAULT_MIN_BUSY
from expertmesh.cluster.demand import executor_sizing, joint_problem
from expertmesh.cluster.local import describe, inventory
from expertmesh.cluster.observed import UsageWatch, observed_profile
from expertmesh.cluster.placement import Plan, plan
from expertmesh.cluster.replan import ClusterSnapshot, ReplanConfig, ReplanKind, ReplanState, decide
from expertmesh.metrics import instruments
from expertmesh.cluster.served import ServedDemand
from expertmesh.profiler.store import UsageProfile

Placement = dict[str, list[str]]  # expert -> the nodes holding it
Observed = tuple[dict[str, float], int]  # (P(expert invoked) per request, requests) over the watch's window


@dataclass(frozen=True)
class Poll:
    """What one poll read."""

    now_s: float
    alive: frozenset[str]  # alive nodes that offer experts memory (the planner's inventory)
    observed: Observed | None = None  # None: the watch saw too few requests (or there is no watch)
    unplaced: frozenset[str] = frozenset()  # experts served that the running placement does not hold
    memory: dict[str, int] | None = None  # alive node -> bytes it offers experts (None: not read)


@dataclass(frozen=True)
class ReplanStep:
    """A re-plan to make: of which kind, with which usage, and the policy state once it is applied."""

    kind: ReplanKind
    reason: str  # for the log
    usage: UsageProfile  # what to plan with
    applied_state: ReplanState

    @property
    def label(self) -> str:
        """The `expertmesh_replans_total{reason}` label."""
        return self.kind.value


def alive_nodes(cluster: dict) -> frozenset[str]:
    """The alive nodes of a `describe()` reading that offer experts memory: the nodes a plan can use."""
    return frozenset(n["name"] for n in cluster["nodes"] if n["alive"] and n["memory_mib"] > 0)


def node_memory(cluster: dict) -> dict[str, int]:
    """Bytes each alive node of a `describe()` reading offers experts."""
    return {n["name"]: int(n["memory_mib"] * 2**20) for n in cluster["nodes"] if n["alive"] and n["memory_mib"] > 0}


def next_step(config: ReplanConfig, state: ReplanState, usage: UsageProfile,
              poll: Poll) -> tuple[ReplanStep | None, ReplanState]:
    """(the re-plan to make or None, the state to keep until a re-plan is applied); `usage` is what the running
    plan assumed."""
    observed_usage = poll.observed[0] if poll.observed is not None else {}
    decision, applied = decide(config, state, ClusterSnapshot(poll.now_s, poll.alive, observed_usage, poll.unplaced,
                                                              dict(poll.memory or {})))
    if decision.kind is None:
        return None, applied
    if decision.kind.uses_observed_usage and poll.observed is not None:
        usage = observed_profile(usage, *poll.observed)
    applied = replace(applied, planned_usage=dict(usage.usage))  # the state remembers what the plan assumed
    return ReplanStep(decision.kind, decision.reason, usage, applied), state


def plan_on_inventory(demand: ServedDemand, requests_per_s: float, usage: UsageProfile, cluster: dict,
                      current: Placement, *, host_num_cpus: float = 1.0, torch_threads: int = 1,
                      dedicate_min_busy: float = DEFAULT_MIN_BUSY, components_per_request: int = 1) -> Plan:
    """The placement of every served CoE's experts for `usage` (the joint usage) on the live inventory of a
    `describe()` reading, moving only what it must; with every expert profiled, each node's pooled hosts too
    (`Plan.executors`, by the memory model), else none (the settings' replicas and the node's memory)."""
    nodes = inventory(cluster)
    problem = joint_problem(demand.coes, demand.costs, nodes, requests_per_s, current=current, usage=usage)
    result = plan(problem)
    if demand.fully_profiled:
        sizing = executor_sizing(demand.coes, demand.costs, usage, nodes, requests_per_s, result, host_num_cpus,
                                 torch_threads, dedicate_min_busy, components_per_request)
        result.executors = {n: x.to_json() for n, x in sizing.items()}
    return result


class Metrics(Protocol):
    def inc(self, name: str, value: float = 1.0, **tags: str) -> None: ...
    def set(self, name: str, value: float, **tags: str) -> None: ...
    def observe(self, name: str, value: float, **tags: str) -> None: ...


class PlacementController(threading.Thread):
    def __init__(self, address: str, demand: ServedDemand | None, usage: UsageProfile,
                 requests_per_s: float, current: Placement, apply: Callable[[Placement, dict[str, dict]], None],
                 *, poll_s: float = 2.0, config: ReplanConfig | None = None, watch: UsageWatch | None = None,
                 log: Callable[[str], None] = print, read_cluster: Callable[[], dict] | None = None,
                 planner: Callable[[UsageProfile, dict, Placement], Plan] | None = None,
                 clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None,
                 executors: dict[str, dict] | None = None) -> None:
        super().__init__(name="placement-controller", daemon=True)
        self.usage, self.apply, self.poll_s, self.log, self.clock = usage, apply, poll_s, log, clock
        self.config = config or ReplanConfig()
        self.watch = watch
        self.read_cluster = read_cluster or (lambda: describe(address))
        self.planner = planner or (lambda u, cluster, cur: plan_on_inventory(demand, requests_per_s, u, cluster, cur))
        self.served = frozenset(demand.keys) if demand is not None else frozenset()  # every CoE's experts, by key
        self.placement = current
        self.executors: dict[str, dict] = dict(executors or {})  # the running plan's pooled hosts per node
        nodes = frozenset(n for ns in current.values() for n in ns)
        self.state = ReplanState(planned_nodes=nodes, planned_usage=dict(usage.usage), last_plan_s=clock())
        self.last_failure = ""  # the error of the last failed poll (logged once, until it changes or a poll works)
        self.stop_event = threading.Event()
        self.metrics = metrics if metrics is not None else instruments()
        self.replans: list[tuple[ReplanKind, float]] = []  # (kind, seconds to plan and apply)

    def run(self) -> None:
        while not self.stop_event.wait(self.poll_s):
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - keep watching; the next poll tries again
                failure = f"{type(exc).__name__}: {exc}"
                if failure != self.last_failure:  # one line per distinct failure, not one per poll
                    self.log(f"placement controller: {failure} (retrying every {self.poll_s:g} s; logged again only "
                             "if the error changes)")
                self.last_failure = failure
            else:
                if self.last_failure:
                    self.log("placement controller: polls work again")
                self.last_failure = ""

    def poll_once(self) -> ReplanStep | None:
        """Read the cluster and the observed usage, decide, and make the re-plan if any. Raises when a re-plan
        fails to plan or apply; the state is then as before, so the next poll decides (and tries) again."""
        observed = self.watch.poll() if self.watch is not None else None
        cluster = self.read_cluster()
        unplaced = self.served - set(self.placement) if self.placement else frozenset()  # none yet: nodes decide
        poll = Poll(self.clock(), alive_nodes(cluster), observed, unplaced, node_memory(cluster))
        if not self.state.planned_memory:  # the first reading: what the running plan was made for
            self.state = replace(self.state, planned_memory={n: b for n, b in (poll.memory or {}).items()
                                                             if n in self.state.planned_nodes})
        step, self.state = next_step(self.config, self.state, self.usage, poll)
        if step is not None:
            self.log(f"re-planning: {step.reason}")
            self._replan(step, cluster)
        self._publish()
        return step

    def _replan(self, step: ReplanStep, cluster: dict) -> Plan:
        t0 = time.perf_counter()
        new = self.planner(step.usage, cluster, self.placement)
        planned_s = time.perf_counter() - t0
        if new.replicas != self.placement or new.executors != self.executors:  # unchanged: no redeploy
            self.apply(new.replicas, new.executors)
        for expert, old_nodes in self.placement.items():  # retire the old placement's series
            for node in set(old_nodes) - set(new.replicas.get(expert, [])):
                self.metrics.set("expertmesh_placement_planned_replicas", 0, expert=expert, node=node)
        self.placement, self.executors, self.usage, self.state = new.replicas, new.executors, step.usage, step.applied_state
        seconds = time.perf_counter() - t0
        self.metrics.inc("expertmesh_replans_total", reason=step.label)
        self.metrics.observe("expertmesh_replan_seconds", seconds)
        self.replans.append((step.kind, seconds))
        off = sorted(e for es in new.offloaded.values() for e in es)
        self.log(f"re-planned and applied in {seconds:.1f} s ({step.reason}; planned in {planned_s:.1f} s): "
                 f"moved {', '.join(new.moved) or 'nothing'}; "
                 + (f"memory short, off the device: {', '.join(off)}; " if off else "") +
                 f"cut {new.cut_weight:.3g} of "
                 f"{new.total_weight:.3g} calls/s; "
                 + ", ".join(f"{e}@{'+'.join(ns)}" for e, ns in new.replicas.items()))
        return new

    def _publish(self) -> None:
        for expert, nodes in self.placement.items():
            for node in nodes:
                self.metrics.set("expertmesh_placement_planned_replicas", 1, expert=expert, node=node)
