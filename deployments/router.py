"""The router deployment: routes batches of requests and sends each expert host one call per wave.

The ingress batches concurrent requests (a short bounded wait) and sends them here together, already
decoded and resized to every expert input size. Step 1 runs the classifier in this process on the whole
batch; step 2 routes each request (`router.plan`: rules, table, fallback) and runs the plans in waves
(`router.waves`): the pending calls of every request grouped by the host that runs their expert
(`router.locality.host_for`), one call per host carrying every row it needs. A host runs what it holds,
dependent calls included, and hands back calls for experts held elsewhere; the router sends those on
until every plan is done. Every host call is bounded by a timeout, and a host lost mid-call (its node
went away) has its rows sent to a surviving host, so an accepted request always ends in a verdict or an
explicit error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, defaultdict

import numpy as np
import ray
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from expertmesh.cluster.labels import NODE_LABEL
from expertmesh.deployments.config import APP_NAME, DEDICATED_DEPLOYMENT, host_deployments
from expertmesh.deployments.deadline import Deadline, ReplicaLost, call_with_deadline, exceeded
from expertmesh.errors import ExpertMeshError, Unavailable
from expertmesh.experts.runtime import ExpertRuntime
from expertmesh.experts.revisions import Revision, RevisionSet, plain_name
from expertmesh.experts.spec import resolve_checkpoint
from expertmesh.metrics import instruments, node_name
from expertmesh.cluster.rollout import RolloutState
from expertmesh.router.canary import Assignment, CanarySplitter, agreement
from expertmesh.router.locality import host_for
from expertmesh.router.plan import Call, Reason, RequestMeta, aggregate, route
from expertmesh.router.trace import TraceEntry
from expertmesh.router.waves import PlanInFlight, merge

MAX_HOST_ROUNDS = 16  # a plan crosses hosts at most this often (the dependency graph is acyclic: a backstop)
logger = logging.getLogger("ray.serve")
SLOW_CALL_S = 5.0  # a host call slower than this is logged (with its host and experts)
NODE_CHECK_S = 0.5  # how often a call to a pinned host checks that the host's node is still alive
LOST_HOLD_S = 10.0  # a pinned host seen dying gets no calls for this long (the node watch or a re-plan then knows)


@serve.deployment
class RouterDeployment:
    """Classify in-process, route, and run the plans of a batch across the expert hosts.

    `hosts` maps a node (or "" for the single unpinned host) to its pooled host deployment, and a dedicated
    deployment's name to it. The placement (user_config `homes`: expert -> node, `dedicated`: expert -> node ->
    deployment) arrives by `reconfigure`, so a re-plan updates a running router instead of replacing it.
    """

    def __init__(self, spec_path: str | None, zoo_root: str, hosts: dict[str, DeploymentHandle],
                 host_timeout_s: float = 30.0, torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.revisions = RevisionSet(spec_path, zoo_root)
        self.spec = self.revisions.base.spec
        self.classifiers: dict[str, ExpertRuntime] = {}  # serving key -> the classifier (revisions may share one)
        self.classifier = self._classifier_of(self.revisions.base)
        self.rollout: dict = RolloutState().router_config()  # which revision each request takes (reconfigure)
        self.coes: dict[str, str] = {}  # the other CoEs served: spec name -> spec file (reconfigure)
        self.coe_rollouts: dict[str, dict] = {}  # their live changes, as `rollout` ("" stable: the CoE's file)
        self._splitter = CanarySplitter()
        self.hosts = dict(hosts)  # host key (a pool's node, or a dedicated deployment's name) -> handle
        self.homes: dict[str, str] = {}
        self.dedicated: dict[str, dict[str, str]] = {}  # expert -> node -> its own deployment (a host key)
        self.held_on: dict[str, frozenset[str]] = {}  # expert -> nodes whose pools hold it (experts on several nodes)
        self._pools: frozenset[str] = frozenset(k for k in hosts if not k.startswith(DEDICATED_DEPLOYMENT + "-"))
        self._node_of: dict[str, str] = {}  # a dedicated deployment's key -> its node
        self.host_timeout_s = host_timeout_s
        self.metrics = instruments()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node = node_name()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._in_flight: Counter[str] = Counter({x.name: 0 for x in self.spec.experts})
        self._lost: dict[str, float] = {}  # pinned hosts seen dying -> when (monotonic s)
        self._alive: frozenset[str] | None = None  # planned nodes seen alive (None: not known yet)
        self._stop = threading.Event()  # set when Serve shuts the replica down: ends the background threads
        self._threads = [threading.Thread(target=self._refresh_gauges, name="router-gauges", daemon=True)]
        self._threads[0].start()

    def __del__(self) -> None:
        """Serve calls this on a graceful replica shutdown: stop the background threads."""
        self._stop.set()

    def reconfigure(self, routing: dict) -> None:
        """Apply a placement: each expert's home node, and the hosts of the planned nodes (handles by deployment
        name: a host that is still deploying takes calls once it is up)."""
        if "rollout" in routing:  # a live change: load the revisions (and their classifiers) before switching to them
            rollout = dict(routing["rollout"])
            for path in self._in_use(rollout, ""):
                self._classifier_of(self.revisions.get(path))
            self.rollout = rollout
        coes = dict(routing.get("coes") or {})
        coe_rollouts = {n: dict(r) for n, r in (routing.get("coe_rollouts") or {}).items() if n in coes}
        other_paths = {*coes.values(), *(p for n, r in coe_rollouts.items() for p in self._in_use(r, coes[n]))}
        for path in other_paths:
            self._classifier_of(self.revisions.get(path))
        self.coes, self.coe_rollouts = coes, coe_rollouts
        in_use = {"", *self._in_use(self.rollout, ""), *other_paths}
        keep = {self.revisions.get(p).spec.router.expert for p in in_use}
        self.classifiers = {k: rt for k, rt in self.classifiers.items() if k in keep}  # a batch in flight keeps its own
        self.homes = dict(routing.get("homes") or {})
        self.dedicated = {e: dict(own) for e, own in (routing.get("dedicated") or {}).items()}
        self.held_on = {e: frozenset(nodes) for e, nodes in (routing.get("held_on") or {}).items()}
        if keys := host_deployments(routing):
            self.hosts = {key: self.hosts.get(key) or serve.get_deployment_handle(
                name, app_name=APP_NAME, _check_exists=False) for key, name in keys.items()}
            self._pools = frozenset(routing.get("host_nodes") or [])
            self._node_of = {name: node for own in self.dedicated.values() for node, name in own.items()}
            if not any(t.name == "router-nodes" for t in self._threads):
                self._threads.append(threading.Thread(target=self._watch_nodes, name="router-nodes", daemon=True))
                self._threads[-1].start()
        self._lost.clear()

    def _watch_nodes(self, every_s: float = 1.0) -> None:
        """Which nodes are alive (from Ray's GCS): calls never wait on a lost node's host."""
        while not self._stop.is_set():
            try:
                alive = frozenset(n.get("Labels", {}).get(NODE_LABEL, "") for n in ray.nodes() if n.get("Alive"))
                for node in alive - (self._alive or frozenset()):  # a node that came back is usable again
                    self._lost.pop(node, None)
                self._alive = alive
            except Exception:  # noqa: BLE001 - keep the last view; the next poll tries again
                pass
            self._stop.wait(every_s)

    def _refresh_gauges(self, every_s: float = 2.0) -> None:
        """Ray ages out gauges that are not set again: re-publish the queue depths, and the classifier held here (the
        router's expert: one replica per router replica), while the replica lives."""
        name = self.classifier.name
        while not self._stop.is_set():
            self.metrics.set("expertmesh_expert_replicas", 1, expert=name, node=self.node)
            self.metrics.set("expertmesh_expert_memory_bytes", self.classifier.footprint_bytes, expert=name,
                             node=self.node, tier="device")
            for expert, depth in list(self._in_flight.items()):
                self.metrics.set("expertmesh_expert_queue_depth", depth, expert=expert)
            self._stop.wait(every_s)

    def _node_alive(self, host: str) -> bool:
        """False once the node watch has seen `host`'s node gone (or a re-plan removed the host)."""
        node = self._node_of.get(host, host)
        return host in self.hosts and (self._alive is None or node in self._alive)

    def _classifier_of(self, rev: Revision) -> ExpertRuntime:
        """The revision's classifier, loaded and warmed the first time (revisions with the same one share it)."""
        e = rev.spec.router_expert
        if e.name not in self.classifiers:
            rt = ExpertRuntime(e, resolve_checkpoint(e, self.revisions.zoo_root), image_limits=rev.spec.image)
            rt.load()
            rt.infer(rt.pixel_values(np.zeros((1, e.input_size_px, e.input_size_px, 3), np.uint8)))  # warm-up
            self.classifiers[e.name] = rt
        return self.classifiers[e.name]

    # ------------------------------------------------------------------ step 1
    @staticmethod
    def _classify(classifier: ExpertRuntime, images_u8: np.ndarray) -> list:
        return classifier.infer(classifier.pixel_values(images_u8))

    async def inspect_batch(self, images: dict[int, np.ndarray], metas: list[dict]) -> list[dict | ExpertMeshError]:
        """A batch of decoded requests (`images`: every input size, [N, S, S, 3] uint8) -> per request its result,
        or the error that ended it (the others still answer). A request's `budget_s` (what its deadline leaves) bounds
        its expert calls: once it passes, the request gets DEADLINE_EXCEEDED and no further calls.

        Each request takes the stable revision, or the canary's when the canary's share of its factory picks it
        (`router.canary`); a canary request runs on the stable revision too, and the two answers' agreement is
        counted. Every revision's rows run together: classify, route, plans across the hosts."""
        t0 = time.perf_counter()
        fallback_s = self.host_timeout_s * MAX_HOST_ROUNDS
        deadlines = [Deadline(fallback_s if m.get("budget_s") is None else float(m["budget_s"])) for m in metas]
        picks = [self._pick(m) for m in metas]
        metas_coe = [m.get("coe", "") for m in metas]
        assigned_under = [str(self._rollout_of(c or self.spec.name)[0].get("revision", 0)) if p is not None else ""
                          for c, p in zip(metas_coe, picks)]  # each request's CoE's rollout, for the comparisons
        metas = [{k: v for k, v in m.items() if k not in ("budget_s", "coe")} for m in metas]
        rows: dict[str, list[int]] = defaultdict(list)  # revision -> the rows it runs (its answers and its shadows)
        for i, pick in enumerate(picks):
            if pick is None:
                continue
            rows[pick.revision].append(i)
            if pick.shadow is not None:
                rows[pick.shadow].append(i)
        revisions = [self.revisions.get(path) for path in rows]
        shadows = {i for i, pick in enumerate(picks) if pick is not None and pick.shadow is not None}
        done = await asyncio.gather(*(self._inspect_rows(rev, rows[rev.path], images, metas, deadlines, t0,
                                                         {i for i in shadows if picks[i].shadow == rev.path})
                                      for rev in revisions))
        results = {rev.path: r for rev, r in zip(revisions, done)}
        out = [results[pick.revision][i] if pick is not None else Unavailable(
            f"CoE {metas_coe[i]!r} is not served by this router yet", fix="retry; the app is being reconfigured")
            for i, pick in enumerate(picks)]
        self._record_rollout(picks, results, out, assigned_under)
        return out

    @staticmethod
    def _in_use(rollout: dict, served: str) -> tuple[str, ...]:
        """The revisions a CoE's live change sends requests to (stable, canary); "" stable: `served`, its file."""
        return (rollout["stable"] or served, *([rollout["canary"]["spec"]] if rollout.get("canary") else []))

    def _rollout_of(self, coe: str) -> tuple[dict, str]:
        """(the live change of `coe`, the file its "" stable revision means); the app's own CoE: ("")."""
        if coe == self.spec.name:
            return self.rollout, ""
        return self.coe_rollouts.get(coe) or RolloutState().router_config(), self.coes[coe]

    def _pick(self, meta: dict) -> Assignment | None:
        """A request's revision: its CoE's (the ingress chose the CoE) stable revision, or its canary's share of the
        request's factory. None: a CoE this router does not know (yet: the ingress learnt it first)."""
        coe = meta.get("coe") or self.spec.name
        if coe != self.spec.name and coe not in self.coes:
            return None
        rollout, served = self._rollout_of(coe)
        return self._splitter.assign(meta.get("factory_id", ""), rollout["stable"] or served, rollout.get("canary"),
                                     coe=coe)

    async def _inspect_rows(self, rev: Revision, rows: list[int], images: dict[int, np.ndarray], metas: list[dict],
                            deadlines: list[Deadline], t0: float, shadows: set[int]
                            ) -> dict[int, dict | ExpertMeshError]:
        """One revision's share of a batch (`rows` of it; `shadows`: those run only for a canary's agreement, left out
        of the routing metrics) -> row -> its result or error."""
        spec, classifier = rev.spec, self._classifier_of(rev)
        missing = sorted(set(spec.input_sizes_px) - set(images))
        if missing:  # decoded before the ingress learnt this revision's sizes: retryable, never the whole batch
            err = Unavailable(f"the request was decoded without the {missing} px input its CoE revision needs",
                              fix="retry; the experts were being changed")
            return {i: err for i in rows}
        everything = len(rows) == len(metas)
        index = np.asarray(rows, dtype=np.int64)
        sub = images if everything else {size: arr[index] for size, arr in images.items()}
        preds = await asyncio.to_thread(self._classify, classifier, sub[classifier.spec.input_size_px])
        step1_ms = (time.perf_counter() - t0) * 1000.0
        def first(p) -> TraceEntry:  # the category classifier's own entry, in this process
            return TraceEntry(classifier.name, p.label, p.score, Reason.ROUTER, "", step1_ms, len(preds), "ready",
                              self.node_id, self.replica_id)
        routes = [route(spec, p.label, p.score, RequestMeta(**metas[i])) for p, i in zip(preds, rows)]
        counted = [r for r, i in zip(routes, rows) if i not in shadows]
        self._record_routes(spec.name, classifier.name, counted, len(counted), time.perf_counter() - t0)
        plans = {k: PlanInFlight.start(r.calls) for k, r in enumerate(routes)}
        traces: dict[int, list[TraceEntry]] = {k: [] for k in plans}
        failed: dict[int, ExpertMeshError] = {}
        await self._run_plans(rev, sub, plans, traces, failed, [deadlines[i] for i in rows])
        out: dict[int, dict | ExpertMeshError] = {}
        for k, (i, r, p) in enumerate(zip(rows, routes, preds)):
            if k in failed:
                out[i] = failed[k]
                continue
            outcome = aggregate(spec, [t.output() for t in traces[k]])
            trace = [first(p)] + traces[k]
            out[i] = {"category": r.category, "category_confidence": r.confidence, "fallback": r.fallback,
                      "rules": list(r.rules), "verdict": outcome.verdict.value, "defect": outcome.defect,
                      "trace": [t.named(rev.names.get(t.expert, plain_name(t.expert)), rev.versions.get(t.expert, ""))
                                for t in trace],
                      "latency_ms": (time.perf_counter() - t0) * 1000.0,
                      "decided_by": rev.names.get(outcome.decided_by or "", plain_name(outcome.decided_by or "")), "coe": spec.name, "coe_version": rev.label}
        return out

    def _record_rollout(self, picks: list, results: dict[str, dict], answers: list, assigned_under: list[str]) -> None:
        """Requests by the revision that answered, and each canary answer's agreement with its stable shadow."""
        counts: Counter[tuple[str, str]] = Counter()
        agreements: Counter[tuple[str, str, str, str]] = Counter()
        for i, pick in enumerate(picks):
            if pick is None:
                continue
            label = self.revisions.get(pick.revision).label
            counts[(label, "canary" if pick.shadow is not None else "stable")] += 1
            if pick.shadow is not None:
                stable = self.revisions.get(pick.shadow).label
                agreements[(label, stable, agreement(results[pick.shadow][i], answers[i]), assigned_under[i])] += 1
        for (label, role), n in counts.items():
            self.metrics.inc("expertmesh_rollout_requests_total", n, coe_version=label, role=role)
        for (canary, stable, outcome, rollout_revision), n in agreements.items():
            self.metrics.inc("expertmesh_canary_comparisons_total", n, canary=canary, stable=stable, outcome=outcome,
                             rollout=rollout_revision)

    # ------------------------------------------------------------------ step 2
    def _planned_keys(self, rev: Revision) -> dict[str, str]:
        """Expert name -> the key it has in the deployed revision of `rev`'s CoE (what the plan placed), for the
        experts a live change gave a new version; empty for the app's own CoE (its deployed keys are the names)."""
        deployed = self.coes.get(rev.spec.name) if rev.spec.name != self.spec.name else None
        if not deployed:
            return {}
        return {name: key for key, name in self.revisions.get(deployed).names.items()}

    async def _run_plans(self, rev: Revision, images: dict[int, np.ndarray], plans: dict[int, PlanInFlight],
                         traces: dict[int, list[dict]], failed: dict[int, ExpertMeshError],
                         deadlines: list[Deadline]) -> None:
        near: dict[int, str] = {}  # row -> the node whose host answered it last (its pending calls stay there if they can)
        planned = self._planned_keys(rev)
        for _ in range(MAX_HOST_ROUNDS):
            for i, plan in plans.items():
                if plan.pending and i not in failed and deadlines[i].passed():  # no more calls for it
                    failed[i] = exceeded("in the router, before its next expert call")
            now = time.monotonic()
            lost = {h for h, t in self._lost.items() if now - t < LOST_HOLD_S}
            by_host: dict[str, dict[int, list[Call]]] = defaultdict(lambda: defaultdict(list))
            for i, plan in plans.items():
                if i in failed:
                    continue
                for call in plan.pending:
                    # a key the plan placed (any served CoE's) goes where the plan put it; another version of a
                    # planned expert (a live change's) goes where the plan put its CoE's deployed version
                    name = call.expert if call.expert in self.homes else planned.get(plain_name(call.expert),
                                                                                     plain_name(call.expert))
                    host = host_for(call.expert, self.homes, self._pools, self._alive, lost, self.dedicated,
                                    near.get(i), self.held_on.get(name, ()), home=self.homes.get(name))
                    if host is None:
                        failed[i] = Unavailable(f"no expert host is available for expert {call.expert!r}",
                                                fix="retry later; the cluster is re-placing the experts of lost nodes")
                        break
                    by_host[host][i].append(call)
                plan.pending = []
            if not by_host:
                return
            await asyncio.gather(*(self._send(rev.path, host, rows, images, plans, traces, failed, near, deadlines)
                                   for host, rows in by_host.items()))
        for i, plan in plans.items():
            if plan.pending and i not in failed:
                failed[i] = Unavailable(f"the plan crossed hosts more than {MAX_HOST_ROUNDS} times",
                                        fix="check the spec's dependencies and the placement")

    async def _send(self, revision: str, host: str, rows: dict[int, list[Call]], images: dict[int, np.ndarray],
                    plans: dict[int, PlanInFlight], traces: dict[int, list[dict]],
                    failed: dict[int, ExpertMeshError], near: dict[int, str], deadlines: list[Deadline]) -> None:
        """One call to one host with every row it needs, bounded by the host timeout or the latest deadline among the
        rows, whichever is sooner; a lost host's rows go back to pending for another."""
        keys = list(rows)
        index = np.asarray(keys, dtype=np.int64)
        sub = {size: arr if len(keys) == len(arr) else arr[index] for size, arr in images.items()}
        experts = Counter(c.expert for k in keys for c in rows[k])
        for e, n in experts.items():
            self._in_flight[e] += n
        handle = self.hosts[host]
        names = ", ".join(sorted(experts))
        what = f"the expert host{' on ' + host if host else ''} (experts {names})"
        latest_s = max(deadlines[k].remaining_s() for k in keys)
        timeout_s = min(self.host_timeout_s, latest_s)
        on_timeout = (lambda: exceeded(f"waiting for {what}")) if latest_s < self.host_timeout_s else None
        call = None
        try:  # a pinned host's loss sends its rows to a survivor at once; the single host is retried (Serve replaces it)
            call = asyncio.ensure_future(call_with_deadline(
                lambda: handle.run.remote(sub, [(rows[k], sorted(plans[k].planned)) for k in keys], revision),
                timeout_s, what, retries_on_loss=0 if host else 4, on_timeout=on_timeout,
                timeout_fix="retry later; if it persists, check the expert hosts",
                full_fix="retry later with backoff; the expert hosts are overloaded",
                failure_fix="retry later; if it persists, check the expert host's logs"))
            sent_s = time.monotonic()
            while not (await asyncio.wait({call}, timeout=NODE_CHECK_S))[0]:
                if host and not self._node_alive(host):  # its node is gone: do not wait for the call's timeout
                    call.cancel()
                    raise ReplicaLost(f"{what} is on a lost node", fix="retry later")
            answers = call.result()
            took_s = time.monotonic() - sent_s
            if took_s > SLOW_CALL_S:
                logger.warning("a call to %s with %d rows took %.1f s", what, len(keys), took_s)
        except ExpertMeshError as err:
            if isinstance(err, ReplicaLost) and host:  # its node went away: the rows try a survivor next round
                self._lost[host] = time.monotonic()
                self.metrics.inc("expertmesh_plan_fallbacks_total", node=host)
                for k in keys:
                    plans[k].pending.extend(rows[k])
            else:
                for k in keys:
                    failed[k] = err
            return
        finally:
            if call is not None and not call.done():  # this batch was cancelled (its clients went): so is the call
                call.cancel()
            for e, n in experts.items():
                self._in_flight[e] -= n
        for k, answer in zip(keys, answers):
            if host:
                near[k] = self._node_of.get(host, host)
            traces[k].extend(answer["trace"])
            done = [(t.call(), t.output()) for t in answer["trace"]]
            merge(plans[k], done, answer["pending"], answer["planned"])

    def _record_routes(self, coe: str, classifier: str, routes: list, num_requests: int, seconds: float) -> None:
        m = self.metrics
        m.observe("expertmesh_route_latency_seconds", seconds)
        m.inc("expertmesh_expert_invocations_total", num_requests, expert=classifier, reason="router")
        m.inc("expertmesh_expert_requests_total", num_requests, expert=classifier, readiness="ready")
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for r in routes:
            counts[("expertmesh_router_decisions_total", r.category)] += 1
            if r.fallback:
                counts[("expertmesh_router_fallbacks_total", r.category)] += 1
            for rule in r.rules:
                counts[("expertmesh_gating_rule_hits_total", rule)] += 1
        for (name, value), n in counts.items():
            m.inc(name, n, **({"rule": value} if name == "expertmesh_gating_rule_hits_total"
                               else {"coe": coe, "category": value}))
