"""Executor sizing (pure): how many expert-host replicas a node's device gets, and how its memory divides.

A host replica runs one batch at a time (one torch worker thread), so each replica keeps room for the
largest batch's activations among the experts it may run, and the rest of its share of the device holds
resident experts. More replicas run more batches at once (up to the node's compute slots: its cores
over the torch threads per replica, on a GPU the copy/compute overlap) but each holds fewer experts, so
more calls wait for a switch. `size_executors` predicts, for every replica count that fits, the calls
per second the node sustains and picks the fewest replicas that sustain twice the calls the plan puts on
the node (else the fastest):

    budget(r)  = memory / r - largest activation            (each replica's resident-expert bytes)
    hit(r)     = share of calls whose expert fits budget(r) (most calls per byte first)
    call_ms(r) = sum_e share_e * (K_e + B_e / batch_e)  +  (1 - hit(r)) * mean switch ms
    rate(r)    = min(r, compute_slots) * 1000 / call_ms(r)

K, B (ms per item and per batch), the batch, the activations and the switch (host memory -> device)
come from the profile; the shares from the usage the placement planned with. The decision goes into
the plan (`expertmesh plan --explain` shows it) and from the plan into each node's host deployment:
its replica count and each replica's device budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field


if TYPE_CHECKING:
    from expertmesh.cluster.dedicate import Dedication


class ExpertCost(BaseModel):
    """What sizing needs of one expert, from its profile."""

    model_config = ConfigDict(frozen=True)

    name: str
    weights_bytes: int = Field(ge=0)
    activation_bytes: int = Field(ge=0, description="one batch's activations at the serving batch size")
    k_ms_per_item: float = Field(ge=0)
    b_ms_per_batch: float = Field(ge=0)
    batch_size: int = Field(ge=1)
    switch_ms: float = Field(ge=0, description="host memory -> device")
    calls_per_s: float = Field(ge=0, description="planned calls per second on this node")


@dataclass(frozen=True)
class ExecutorSizing:
    num_replicas: int
    device_budget_bytes: int  # per replica, for resident experts
    activation_reserve_bytes: int  # per replica
    predicted_calls_per_s: float
    hit_share: float  # share of calls whose expert stays resident
    reason: str
    dedicated: dict[str, Dedication] = field(default_factory=dict)  # the node's hot experts (`cluster.dedicate`)

    def to_json(self) -> dict:
        return {"num_replicas": self.num_replicas, "device_budget_bytes": self.device_budget_bytes,
                "activation_reserve_bytes": self.activation_reserve_bytes,
                "predicted_calls_per_s": round(self.predicted_calls_per_s, 3), "hit_share": round(self.hit_share, 4),
                "reason": self.reason, "dedicated": {e: d.to_json() for e, d in sorted(self.dedicated.items())}}


def _hit_share(experts: list[ExpertCost], budget_bytes: int) -> float:
    """Share of calls whose expert fits when the most-called experts fill `budget_bytes` first."""
    total = sum(e.calls_per_s for e in experts)
    if total <= 0:
        return 1.0
    used, hit = 0, 0.0
    for e in sorted(experts, key=lambda e: (-e.calls_per_s / max(e.weights_bytes, 1), e.name)):
        if used + e.weights_bytes <= budget_bytes:
            used += e.weights_bytes
            hit += e.calls_per_s
    return hit / total


def predict(experts: list[ExpertCost], memory_bytes: int, num_replicas: int,
            compute_slots: float) -> ExecutorSizing | None:
    """The sizing with `num_replicas` replicas, or None when a replica could not hold the largest expert."""
    reserve = max((e.activation_bytes for e in experts), default=0)
    budget = memory_bytes // num_replicas - reserve
    if budget < max((e.weights_bytes for e in experts), default=0) or budget <= 0:
        return None
    hit = _hit_share(experts, budget)
    total = sum(e.calls_per_s for e in experts)
    weights = [(e.calls_per_s / total if total > 0 else 1 / len(experts)) for e in experts] if experts else []
    call_ms = sum(w * (e.k_ms_per_item + e.b_ms_per_batch / e.batch_size) for w, e in zip(weights, experts))
    switch_ms = sum(w * e.switch_ms for w, e in zip(weights, experts))
    call_ms += (1.0 - hit) * switch_ms
    rate = min(num_replicas, compute_slots) * 1000.0 / call_ms if call_ms > 0 else float("inf")
    return ExecutorSizing(num_replicas, budget, reserve, rate, hit, "")


def size_executors(experts: list[ExpertCost], memory_bytes: int, compute_slots: float,
                   max_replicas: int = 8, headroom: float = 2.0) -> ExecutorSizing:
    """The fewest replicas (1..max_replicas) whose predicted rate covers `headroom` x the planned calls/s; when none
    does, the count with the highest predicted rate (fewer on a tie within 2%)."""
    options = [s for r in range(1, max(1, max_replicas) + 1)
               if (s := predict(experts, memory_bytes, r, compute_slots)) is not None]
    if not options:
        reserve = max((e.activation_bytes for e in experts), default=0)
        largest = max((e.weights_bytes for e in experts), default=0)
        return ExecutorSizing(1, max(0, memory_bytes - reserve), reserve, 0.0, 0.0,
                              f"one replica: even alone it cannot hold the largest expert ({largest} bytes) beside "
                              f"a batch's activations ({reserve} bytes); calls will wait for switches")
    demand = headroom * sum(e.calls_per_s for e in experts)
    enough = [o for o in options if o.predicted_calls_per_s >= demand]
    best = max(o.predicted_calls_per_s for o in options)
    pick = enough[0] if enough else next(o for o in options if o.predicted_calls_per_s >= 0.98 * best)
    alt = ", ".join(f"{o.num_replicas}: {o.predicted_calls_per_s:.0f}/s at {100 * o.hit_share:.0f}% resident"
                    for o in options)
    why = (f"{'the fewest that cover' if enough else 'none covers, so the fastest for'} {demand:.1f} calls/s "
           f"({headroom:g}x the planned); predicted calls/s by replicas over {compute_slots:g} compute slots: {alt}")
    return ExecutorSizing(pick.num_replicas, pick.device_budget_bytes, pick.activation_reserve_bytes,
                          pick.predicted_calls_per_s, pick.hit_share, why)
