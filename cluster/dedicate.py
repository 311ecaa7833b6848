"""Dedicated deployment or pool, per expert (pure): which of a node's experts get their own autoscaled deployment.

A pooled host replica runs one batch at a time for many experts and switches between them; that is what the long
tail needs. A hot expert is different: its calls alone keep a replica busy, so in a pool it would crowd the tail
out of the pool's compute (and its batches would wait behind the tail's switches), while on its own it never
switches and Serve's autoscaler can follow its load alone. An expert gets a dedicated deployment on its home node
(beside the experts it depends on or that depend on it, as the placement put them) when

    busy_e = calls_e/s x (K_e + B_e / batch_e) / 1000  >=  min_busy    (replica-seconds per second)

and the node can afford it: its max replicas' memory (weights + a batch's activations each) leaves the pool room
for its largest expert, and its replicas leave the pool at least one compute slot. Replicas: the fewest that keep
each below `target_busy` (min), twice that (max, Serve's autoscaler moves between them), within the node's compute
slots. Hottest experts are considered first. K, B, the batch and the bytes come from the profile (`ExpertCost`);
the calls from the usage the placement planned with. The decision goes into the plan beside the pool's sizing
(`cluster.memory_model`), which then sizes the pool on what is left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from expertmesh.cluster.costs import ExpertCost

DEFAULT_MIN_BUSY = 0.5  # an expert whose calls keep half a replica busy gets its own deployment
TARGET_BUSY = 0.5  # a dedicated replica planned at most half busy (headroom for bursts and for autoscaling to act)


@dataclass(frozen=True)
class Dedication:
    expert: str
    min_replicas: int
    max_replicas: int
    device_budget_bytes: int  # per replica: the expert's weights (it is always resident)
    replica_bytes: int  # per replica: weights + a batch's activations
    busy: float  # replica-seconds per second its planned calls take
    reason: str

    def to_json(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "device_budget_bytes": self.device_budget_bytes, "replica_bytes": self.replica_bytes,
                "busy": round(self.busy, 4), "reason": self.reason}


@dataclass(frozen=True)
class Split:
    """A node's experts divided: the dedicated ones, and what the pool keeps (experts, memory, compute slots)."""

    dedicated: dict[str, Dedication]
    pooled: list[ExpertCost]
    pool_memory_bytes: int
    pool_compute_slots: float
    reasons: dict[str, str]  # every expert -> why it is dedicated or pooled


def busy(e: ExpertCost) -> float:
    """Replica-seconds per second the expert's planned calls take at its serving batch."""
    return e.calls_per_s * (e.k_ms_per_item + e.b_ms_per_batch / e.batch_size) / 1000.0


def split(experts: list[ExpertCost], memory_bytes: int, compute_slots: float,
          min_busy: float = DEFAULT_MIN_BUSY) -> Split:
    """Divide a node's experts between dedicated deployments and the node's pool (see the module docstring)."""
    dedicated: dict[str, Dedication] = {}
    reasons: dict[str, str] = {}
    pooled = sorted(experts, key=lambda e: (-busy(e), e.name))
    memory, slots = memory_bytes, compute_slots
    for e in list(pooled):
        b = busy(e)
        if b < min_busy:
            reasons[e.name] = f"pooled: its calls take {b:.3g} replica-s/s, below {min_busy:g}"
            continue
        rest = [x for x in pooled if x is not e]
        lo = max(1, math.ceil(b / TARGET_BUSY))
        hi = max(lo, min(2 * lo, math.floor(slots - (1 if rest else 0))))
        per_replica = e.weights_bytes + e.activation_bytes
        pool_needs = (max((x.weights_bytes for x in rest), default=0)
                      + max((x.activation_bytes for x in rest), default=0)) if rest else 0
        if slots - (1 if rest else 0) < lo:
            reasons[e.name] = (f"pooled: hot ({b:.3g} replica-s/s) but {lo} replica(s) of its own would leave the pool "
                               f"no compute slot of {slots:g}")
            continue
        if memory - hi * per_replica < pool_needs:
            reasons[e.name] = (f"pooled: hot ({b:.3g} replica-s/s) but {hi} replica(s) of {per_replica / 2**20:.1f} MiB "
                               f"would leave the pool too little memory for its largest expert")
            continue
        memory -= hi * per_replica
        slots -= lo
        pooled.remove(e)
        why = f"dedicated: its calls take {b:.3g} replica-s/s (>= {min_busy:g}); its own replicas never switch"
        dedicated[e.name] = Dedication(e.name, lo, hi, e.weights_bytes, per_replica, b, why)
        reasons[e.name] = why
    return Split(dedicated, sorted(pooled, key=lambda e: e.name), memory, slots, reasons)
