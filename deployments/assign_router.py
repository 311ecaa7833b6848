"""Serve's request router for the pooled hosts: each batch of calls goes to the replica predicted to finish it first.

Ray Serve lets a deployment plug in its own request router (`RequestRouterConfig.request_router_class`); every handle
to the `Host` deployment then routes with this one. For a host's `run(images, plans)` call it counts the calls per
expert in the plans and ranks the candidate replicas with `router.assign.rank_replicas` (pure): the work queued ahead
on each replica (the calls this handle has sent there and not had answered, per expert) at the profile's K*n+B, plus
the switch cost unless the expert is on that replica's device (each replica's resident experts, from its
`record_routing_stats`, refreshed every `request_routing_stats_period_s`) or already queued there. Serve then sends to
the first ranked replica that has room. Calls other than `run` (info, stats) and requests whose plans it cannot read
keep Serve's order. Costs come from the profile through `request_router_kwargs`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from expertmesh.router.assign import ExpertCost, ReplicaSnapshot, rank_replicas
from expertmesh.router.plan import Call


def calls_of(pending_request: PendingRequest | None) -> Counter[str]:
    """Calls per expert of a `run(images, plans)` request (empty for any other call)."""
    if pending_request is None or pending_request.metadata.call_method != "run" or len(pending_request.args) < 2:
        return Counter()
    plans = pending_request.args[1]
    if not isinstance(plans, list):
        return Counter()
    return Counter(c.expert for p in plans if isinstance(p, (list, tuple)) and p for c in p[0] if isinstance(c, Call))


class AssignRequestRouter(FIFOMixin, RequestRouter):
    """FIFOMixin (as Serve's default router has): a replica that frees up takes the oldest pending request."""

    def initialize_state(self, costs: dict[str, list[float]] | None = None, **_: Any) -> None:
        """`costs`: expert -> [K ms per item, B ms per batch, switch ms] from the profile."""
        self._costs = {e: ExpertCost(*map(float, v)) for e, v in (costs or {}).items()}
        self._outstanding: dict[ReplicaID, dict[str, Counter[str]]] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:  # every replica is ranked at once: when none has room, back off (Serve
            pending_request.routing_context.should_backoff = True  # retries at once, spinning, while this is False)
        calls = calls_of(pending_request)
        if not calls or len(candidate_replicas) < 2:
            return [candidate_replicas]
        snaps = [ReplicaSnapshot(r.replica_id.unique_id, queued=self._queued(r.replica_id),
                                 resident=frozenset((r.routing_stats or {}).get("resident", ())))
                 for r in candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[rid]] for rid in rank_replicas(snaps, calls, self._costs)]

    def _queued(self, replica_id: ReplicaID) -> dict[str, int]:
        total: Counter[str] = Counter()
        for calls in self._outstanding.get(replica_id, {}).values():
            total.update(calls)
        return dict(total)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        calls = calls_of(pending_request)
        if calls:
            self._outstanding.setdefault(replica_id, {})[pending_request.metadata.internal_request_id] = calls

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._outstanding.get(replica_id, {}).pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._outstanding.pop(replica_id, None)
