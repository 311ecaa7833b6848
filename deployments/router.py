"""The router deployment: step 1 classifies, step 2 runs the plan through DeploymentHandles.

Decisions are `router.plan`'s (pure): the route (rules, table, fallback), which outputs trigger
which experts, and the verdict. This glue calls the experts: independent calls concurrently,
each output's triggered experts as soon as it arrives, and every call bounded by a timeout, so an
accepted request always ends in a result or an explicit error.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from expertmesh.cluster.labels import NODE_LABEL
from expertmesh.deployments.config import APP_NAME, executor_name
from expertmesh.deployments.deadline import ReplicaLost, call_with_deadline
from expertmesh.experts.graph import longest_chain
from expertmesh.experts.spec import load_spec
from expertmesh.metrics import instruments
from expertmesh.router.locality import plan_runner
from expertmesh.router.plan import Call, ExpertOutput, Reason, RequestMeta, aggregate, route, triggered_calls


@serve.deployment
class RouterDeployment:
    """The front router (classify, route, run or hand off the plan) and, pinned to one node, a plan executor.

    With a placement (user_config `homes`: expert -> home node; `executor_nodes`) the front hands each plan to the
    executor on the node that holds it, and every expert handle prefers replicas on its caller's node. The
    placement arrives by `reconfigure`, so a re-plan updates a running router instead of replacing it.
    """

    def __init__(self, spec_path: str | None, experts: dict[str, DeploymentHandle], expert_timeout_s: float = 30.0,
                 executors: dict[str, DeploymentHandle] | None = None) -> None:
        self.spec = load_spec(spec_path)
        self._handles = dict(experts)
        self.homes: dict[str, str] = {}
        self.executors: dict[str, DeploymentHandle] = {}
        self.experts = dict(experts)
        self.expert_timeout_s = expert_timeout_s
        # the executor bounds each expert call; a hand-off is bounded by the longest chain of calls
        self.plan_timeout_s = expert_timeout_s * (1 + longest_chain(self.spec))
        self.metrics = instruments()
        self._in_flight = {name: 0 for name in experts}
        self._stop = threading.Event()  # set when Serve shuts the replica down: ends the background threads
        self._threads = [threading.Thread(target=self._refresh_gauges, name="router-gauges", daemon=True)]
        self._threads[0].start()
        self._alive: frozenset[str] | None = None  # planned nodes seen alive (None: not known yet)
        self._local = False

    def __del__(self) -> None:
        """Serve calls this on a graceful replica shutdown: stop the background threads."""
        self._stop.set()

    def reconfigure(self, routing: dict) -> None:
        """Apply a placement: homes, the plan executors (handles by deployment name) and local-first expert calls."""
        self.homes = dict(routing.get("homes") or {})
        if self.homes and not self._local:  # a placement exists: replicas beside the caller are preferred. A handle
            # takes this once (it initialises the handle), so later placements keep it
            self.experts = {k: h.options(_prefer_local_routing=True) for k, h in self._handles.items()}
            self._local = True
        self.executors = {node: serve.get_deployment_handle(executor_name(node), app_name=APP_NAME,
                                                            _check_exists=False)  # may still be deploying
                          for node in routing.get("executor_nodes") or []}
        if self.executors and not any(t.name == "router-nodes" for t in self._threads):
            self._threads.append(threading.Thread(target=self._watch_nodes, name="router-nodes", daemon=True))
            self._threads[-1].start()

    def _watch_nodes(self, every_s: float = 1.0) -> None:
        """Which planned nodes are alive (from Ray's GCS): a plan is never handed to a lost node's executor, whose
        handle would hold the request until the re-plan removes it."""
        while not self._stop.is_set():
            try:
                self._alive = frozenset(n.get("Labels", {}).get(NODE_LABEL, "") for n in ray.nodes() if n.get("Alive"))
            except Exception:  # noqa: BLE001 - keep the last view; the next poll tries again
                pass
            self._stop.wait(every_s)

    def _refresh_gauges(self, every_s: float = 2.0) -> None:
        """Ray ages out gauges that are not set again: re-publish the queue depths while the replica lives."""
        while not self._stop.is_set():
            for expert, depth in list(self._in_flight.items()):
                self.metrics.set("expertmesh_expert_queue_depth", depth, expert=expert)
            self._stop.wait(every_s)

    async def _call(self, call: Call, image: np.ndarray, reason: str | None = None) -> dict:
        m, expert = self.metrics, call.expert
        m.inc("expertmesh_expert_invocations_total", expert=expert, reason=reason or call.reason.value)
        self._in_flight[expert] += 1
        m.set("expertmesh_expert_queue_depth", self._in_flight[expert], expert=expert)
        t0 = time.perf_counter()
        try:
            handle = self.experts[call.expert]
            res = await call_with_deadline(lambda: handle.classify.remote(image), self.expert_timeout_s,
                                f"expert {call.expert!r}", timeout_fix="retry later; if it persists, check the expert's replicas",
                                full_fix="retry later with backoff; the expert is scaling up or overloaded",
                                failure_fix="retry later; if it persists, check the expert's logs")
        finally:
            self._in_flight[expert] -= 1
            m.set("expertmesh_expert_queue_depth", self._in_flight[expert], expert=expert)
            m.observe("expertmesh_expert_latency_seconds", time.perf_counter() - t0, expert=expert)
        return {**res, "expert": call.expert, "reason": call.reason.value, "because_of": call.because_of or ""}

    async def _run(self, call: Call, image: np.ndarray, planned: set[str]) -> list[dict]:
        """Run one call, then (concurrently) everything its output triggers; results in call order."""
        res = await self._call(call, image)
        children = triggered_calls(self.spec, ExpertOutput(call.expert, res["label"], res["score"]), planned)
        planned.update(c.expert for c in children)  # concurrent branches see them as planned: each runs once
        nested = await asyncio.gather(*(self._run(c, image, planned) for c in children))
        return [res] + [r for group in nested for r in group]

    async def inspect(self, image: np.ndarray, meta: dict) -> dict:
        """Classify, plan, run and aggregate one decoded RGB image [H, W, 3]."""
        t0 = time.perf_counter()
        router_call = Call(self.spec.router.expert, Reason.TABLE, None)
        first = await self._call(router_call, image, reason="router")
        first["reason"] = "router"
        r = route(self.spec, first["label"], first["score"], RequestMeta(**meta))
        self._record_route(r, time.perf_counter() - t0)
        node = plan_runner(r.calls, self.homes, self._alive, self.executors.keys())
        if node is not None:  # hand the plan to the node that holds its experts
            executor = self.executors[node]
            try:
                results = await call_with_deadline(lambda: executor.run_plan.remote(image, list(r.calls)), self.plan_timeout_s,
                                        f"the plan executor on {node}", retries_on_loss=0,
                                        timeout_fix="retry later; if it persists, check that node",
                                        full_fix="retry later", failure_fix="retry; if it persists, check that node")
            except ReplicaLost:  # that node is gone (a re-plan is under way): run the plan from here instead
                self.metrics.inc("expertmesh_plan_fallbacks_total", node=node)
                results = await self.run_plan(image, list(r.calls))
        else:
            results = await self.run_plan(image, list(r.calls))
        outcome = aggregate(self.spec, [ExpertOutput(x["expert"], x["label"], x["score"]) for x in results])
        return {
            "category": r.category, "category_confidence": r.confidence, "fallback": r.fallback, "rules": list(r.rules),
            "verdict": outcome.verdict.value, "defect": outcome.defect, "trace": [first] + results,
            "latency_ms": (time.perf_counter() - t0) * 1000.0, "decided_by": outcome.decided_by or "",
        }

    async def run_plan(self, image: np.ndarray, calls: list[Call]) -> list[dict]:
        """Run the plan's first calls concurrently and everything they trigger; results in call order."""
        planned = {c.expert for c in calls}
        groups = await asyncio.gather(*(self._run(c, image, planned) for c in calls))
        return [res for g in groups for res in g]

    def _record_route(self, r, seconds: float) -> None:
        m = self.metrics
        m.observe("expertmesh_route_latency_seconds", seconds)
        m.inc("expertmesh_router_decisions_total", category=r.category)
        if r.fallback:
            m.inc("expertmesh_router_fallbacks_total", category=r.category)
        for rule in r.rules:
            m.inc("expertmesh_gating_rule_hits_total", rule=rule)
