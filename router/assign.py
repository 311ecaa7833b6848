"""Which pooled host replica takes an expert call: the one that finishes it first (CoServe's assign). Pure.

For each candidate replica, from a snapshot of its queue (calls waiting or running, per expert) and what it holds
on the device, the predicted completion time of `n` more calls of expert `e` is the work queued ahead of them
(each queued expert's batch at the profile's K*n + B) plus the call's own cost: only K*n when `e` already has a
batch queued there (the calls join it), else K*n + B, plus the switch cost (the profiled load time from the tier the
expert sits in) unless `e` is resident or already queued there. Ties go to the replica listed first, so the choice is
deterministic. The Ray glue (a request router plugged into Serve, or the router's own host choice) reads the
snapshot and applies the decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpertCost:
    k_ms_per_item: float  # marginal cost of one more image in a batch (profile fit)
    b_ms: float  # fixed cost of a batch
    switch_ms: float  # load time onto the device when it is not resident (from the tier it is in)

    def batch_ms(self, num_items: int) -> float:
        return self.k_ms_per_item * num_items + self.b_ms if num_items > 0 else 0.0


@dataclass(frozen=True)
class ReplicaSnapshot:
    replica_id: str
    queued: Mapping[str, int] = field(default_factory=dict)  # expert -> calls waiting or running
    resident: frozenset[str] = frozenset()  # experts on the device


def predicted_ms(replica: ReplicaSnapshot, expert: str, num_items: int, costs: Mapping[str, ExpertCost]) -> float:
    """When `num_items` calls of `expert` sent to `replica` now would be done (ms from now)."""
    ahead = sum(costs[e].batch_ms(n) for e, n in replica.queued.items() if e != expert and n > 0)
    cost = costs[expert]
    joining = replica.queued.get(expert, 0)
    own = cost.batch_ms(joining + num_items)  # the expert's batch there, with these calls in it
    switch = 0.0 if expert in replica.resident or joining > 0 else cost.switch_ms
    return ahead + own + switch


def choose_replica(replicas: Sequence[ReplicaSnapshot], expert: str, num_items: int,
                   costs: Mapping[str, ExpertCost]) -> str | None:
    """The replica id that would finish the calls first; None when there is no replica."""
    best: tuple[float, int] | None = None
    choice = None
    for i, r in enumerate(replicas):
        key = (predicted_ms(r, expert, num_items, costs), i)
        if best is None or key < best:
            best, choice = key, r.replica_id
    return choice


DEFAULT_COST = ExpertCost(k_ms_per_item=1.0, b_ms=2.0, switch_ms=10.0)  # an expert with no profile: a small model


def rank_replicas(replicas: Sequence[ReplicaSnapshot], calls: Mapping[str, int],
                  costs: Mapping[str, ExpertCost]) -> list[str]:
    """Replica ids, best first, for a batch of calls (`calls`: expert -> number of calls): the predicted completion of
    the batch is the queued work ahead of it plus each expert's batch with its switch where needed (`predicted_ms`
    per expert, the queue ahead counted once). Experts without a cost get `DEFAULT_COST`. Ties keep the given order."""
    full = {**{e: DEFAULT_COST for e in calls}, **costs}
    scored = []
    for i, r in enumerate(replicas):
        ahead = sum(full.get(e, DEFAULT_COST).batch_ms(n) for e, n in r.queued.items() if n > 0 and e not in calls)
        own = sum(predicted_ms(ReplicaSnapshot(r.replica_id, {e: r.queued.get(e, 0)}, r.resident), e, n, full)
                  for e, n in calls.items() if n > 0)
        scored.append((ahead + own, i, r.replica_id))
    return [rid for _, _, rid in sorted(scored)]
