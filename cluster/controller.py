"""The placement controller's loop (glue): watch the live cluster, re-plan, re-apply.

Every `poll_s` it reads the alive nodes, asks `cluster.replan.decide` (pure) whether to re-plan, and
if so plans again on the live inventory (`cluster.placement.plan`) and hands the new placement to
`apply` (which redeploys the Serve app with it). Each change is logged and exported as metrics
(`expertmesh_replans_total{reason}`, `expertmesh_replan_seconds`, `expertmesh_placement_planned_replicas`).
Traffic drift: a `UsageWatch` scrapes the experts' invocation counters from every node; when the
observed usage drifts from the one the plan assumed (past the threshold, for the hold time, see
`cluster.replan`), the controller re-plans with the observed usage. Every re-plan passes the running
placement as `current`, so the planner moves only what it must and Serve restarts only those replicas.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from expertmesh.cluster.demand import placement_problem
from expertmesh.cluster.local import describe, inventory
from expertmesh.cluster.observed import UsageWatch, observed_profile
from expertmesh.cluster.placement import Plan, plan
from expertmesh.cluster.replan import ClusterSnapshot, ReplanConfig, ReplanState, decide
from expertmesh.experts.spec import CoESpec
from expertmesh.metrics import instruments
from expertmesh.profiler.store import ExpertProfile, UsageProfile


class PlacementController(threading.Thread):
    def __init__(self, address: str, spec: CoESpec, profiles: dict[str, ExpertProfile], usage: UsageProfile,
                 requests_per_s: float, current: dict[str, list[str]], apply: Callable[[dict[str, list[str]]], None],
                 *, poll_s: float = 2.0, config: ReplanConfig | None = None, watch: UsageWatch | None = None,
                 log: Callable[[str], None] = print) -> None:
        super().__init__(name="placement-controller", daemon=True)
        self.address, self.spec, self.profiles, self.usage = address, spec, profiles, usage
        self.requests_per_s, self.apply, self.poll_s, self.log = requests_per_s, apply, poll_s, log
        self.config = config or ReplanConfig()
        self.watch = watch
        self.placement = current
        nodes = frozenset(n for ns in current.values() for n in ns)
        self.state = ReplanState(planned_nodes=nodes, planned_usage=dict(usage.usage), last_plan_s=time.monotonic())
        self.stop_event = threading.Event()
        self.metrics = instruments()
        self.replans: list[tuple[str, float]] = []  # (reason, seconds to plan and apply)

    def _publish(self) -> None:
        for expert, nodes in self.placement.items():
            for node in nodes:
                self.metrics.set("expertmesh_placement_planned_replicas", 1, expert=expert, node=node)

    def replan_now(self, reason: str, observed: tuple[dict[str, float], int] | None = None,
                   cluster: dict | None = None) -> Plan:
        """Plan on the live inventory (`cluster`: a `describe()` already read this poll) and apply it."""
        t0 = time.perf_counter()
        nodes = inventory(cluster if cluster is not None else describe(self.address))
        if observed is not None and "drift" in reason:
            self.usage = observed_profile(self.usage, *observed)
        problem = placement_problem(self.spec, self.profiles, self.usage, nodes, self.requests_per_s,
                                    current=self.placement)
        new = plan(problem)
        planned_s = time.perf_counter() - t0
        for expert, old_nodes in self.placement.items():  # retire the old placement's series
            for node in set(old_nodes) - set(new.replicas.get(expert, [])):
                self.metrics.set("expertmesh_placement_planned_replicas", 0, expert=expert, node=node)
        if new.replicas != self.placement:  # an unchanged placement needs no redeploy
            self.apply(new.replicas)
        self.placement = new.replicas
        seconds = time.perf_counter() - t0
        kind = "node_lost" if "lost" in reason else "node_joined" if "joined" in reason else "drift"
        self.metrics.inc("expertmesh_replans_total", reason=kind)
        self.metrics.observe("expertmesh_replan_seconds", seconds)
        self.replans.append((reason, seconds))
        self.log(f"re-planned and applied in {seconds:.1f} s ({reason}; planned in {planned_s:.1f} s): "
                 f"moved {', '.join(new.moved) or 'nothing'}; "
                 f"cut {new.cut_weight:.3g} of "
                 f"{new.total_weight:.3g} calls/s; " + ", ".join(f"{e}@{'+'.join(ns)}" for e, ns in new.replicas.items()))
        return new

    def run(self) -> None:
        while not self.stop_event.wait(self.poll_s):
            try:
                observed = self.watch.poll() if self.watch is not None else None
                cluster = describe(self.address)
                alive = frozenset(n["name"] for n in cluster["nodes"] if n["alive"])
                snap = ClusterSnapshot(time.monotonic(), alive, observed[0] if observed else {})
                before = self.state
                decision, self.state = decide(self.config, self.state, snap)
                if decision.replan:
                    self.log(f"re-planning: {decision.reason}")
                    try:
                        self.replan_now(decision.reason, observed, cluster)
                    except Exception:
                        self.state = before  # not applied: the next poll decides (and tries) again
                        raise
                self._publish()
            except Exception as exc:  # noqa: BLE001 - keep watching; the next poll tries again
                self.log(f"placement controller: {type(exc).__name__}: {exc}")
