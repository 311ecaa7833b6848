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
from collections.abc import Awaitable, Callable

import numpy as np
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from expertmesh.errors import ExpertMeshError, ResourceExhausted, Unavailable
from expertmesh.experts.graph import longest_chain
from expertmesh.experts.spec import load_spec
from expertmesh.metrics import instruments
from expertmesh.router.locality import execution_node
from expertmesh.router.plan import Call, ExpertOutput, Reason, RequestMeta, aggregate, route, triggered_calls


class ExpertCallFailed(Unavailable):
    """An expert the plan needed did not answer (it failed, or ran past its timeout)."""


class ReplicaLost(ExpertCallFailed):
    """The replica serving a call died (its node went away) and a retry found no other."""


LOSS_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)  # waits before the retries of a call whose replica died


async def bounded(send: Callable[[], Awaitable], timeout_s: float, what: str, *, timeout_fix: str, full_fix: str,
                  failure_fix: str, retries_on_loss: int = 4, wrap_failures: bool = True):
    """Await `send()` (a DeploymentHandle call) within `timeout_s`; whatever goes wrong becomes an explicit error
    naming `what`: a timeout or a crash -> ExpertCallFailed (UNAVAILABLE), a full queue -> RESOURCE_EXHAUSTED.
    A call whose replica died (its node was lost) is sent again, up to `retries_on_loss` times with a growing pause
    (`LOSS_BACKOFF_S`), within the same deadline: inference is idempotent, and once Serve has noticed the loss the
    handle routes the retry to a live replica, or holds it until a replacement is up. `wrap_failures=False`
    re-raises an error from inside the replica as it is (the ingress turns those into INTERNAL)."""
    deadline = time.monotonic() + timeout_s
    for attempt in range(retries_on_loss + 1):
        try:
            return await asyncio.wait_for(send(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ExpertCallFailed(f"{what} did not answer within {timeout_s:g} s", fix=timeout_fix) from None
        except ExpertMeshError:
            raise
        except BackPressureError:
            raise ResourceExhausted(f"{what} has a full queue", fix=full_fix) from None
        except (RayActorError, DeploymentUnavailableError) as exc:  # the replica or its node died, or a redeploy
            # removed the deployment (a lost node's plan executor): retry while the deadline allows
            pause_s = LOSS_BACKOFF_S[min(attempt, len(LOSS_BACKOFF_S) - 1)]
            if attempt == retries_on_loss or time.monotonic() + pause_s >= deadline:
                raise ReplicaLost(f"{what} lost its replica ({type(exc).__name__})", fix=failure_fix) from None
            await asyncio.sleep(pause_s)
        except Exception as exc:  # noqa: BLE001 - an error inside the replica
            if not wrap_failures:
                raise
            raise ExpertCallFailed(f"{what} failed ({type(exc).__name__})", fix=failure_fix) from None


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
        threading.Thread(target=self._refresh_gauges, name="router-gauges", daemon=True).start()
        self._alive: frozenset[str] | None = None  # planned nodes seen alive (None: not known yet)
        self._watching = False
        self._local = False

    def reconfigure(self, routing: dict) -> None:
        """Apply a placement: homes, the plan executors (handles by deployment name) and local-first expert calls."""
        from expertmesh.deployments.config import APP_NAME, executor_name

        self.homes = dict(routing.get("homes") or {})
        if self.homes and not self._local:  # a placement exists: replicas beside the caller are preferred. A handle
            # takes this once (it initialises the handle), so later placements keep it
            self.experts = {k: h.options(_prefer_local_routing=True) for k, h in self._handles.items()}
            self._local = True
        self.executors = {node: serve.get_deployment_handle(executor_name(node), app_name=APP_NAME,
                                                            _check_exists=False)  # may still be deploying
                          for node in routing.get("executor_nodes") or []}
        if self.executors and not self._watching:
            self._watching = True
            threading.Thread(target=self._watch_nodes, name="router-nodes", daemon=True).start()

    def _watch_nodes(self, every_s: float = 1.0) -> None:
        """Which planned nodes are alive (from Ray's GCS): a plan is never handed to a lost node's executor, whose
        handle would hold the request until the re-plan removes it."""
        import ray

        from expertmesh.cluster.local import NODE_LABEL

        while True:
            try:
                self._alive = frozenset(n.get("Labels", {}).get(NODE_LABEL, "") for n in ray.nodes() if n.get("Alive"))
            except Exception:  # noqa: BLE001 - keep the last view; the next poll tries again
                pass
            time.sleep(every_s)

    def _refresh_gauges(self, every_s: float = 2.0) -> None:
        """Ray ages out gauges that are not set again: re-publish the queue depths while the replica lives."""
        while True:
            for expert, depth in list(self._in_flight.items()):
                self.metrics.set("expertmesh_expert_queue_depth", depth, expert=expert)
            time.sleep(every_s)

    async def _call(self, call: Call, image: np.ndarray, reason: str | None = None) -> dict:
        m, expert = self.metrics, call.expert
        m.inc("expertmesh_expert_invocations_total", expert=expert, reason=reason or call.reason.value)
        self._in_flight[expert] += 1
        m.set("expertmesh_expert_queue_depth", self._in_flight[expert], expert=expert)
        t0 = time.perf_counter()
        try:
            handle = self.experts[call.expert]
            res = await bounded(lambda: handle.classify.remote(image), self.expert_timeout_s,
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
        node = execution_node(r.calls, self.homes, self._alive) if self.executors else None
        if node in self.executors:  # hand the plan to the node that holds its experts
            executor = self.executors[node]
            try:
                results = await bounded(lambda: executor.run_plan.remote(image, list(r.calls)), self.plan_timeout_s,
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
