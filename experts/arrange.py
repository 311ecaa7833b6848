"""What a pooled host runs next from its queue: arrange and split (CoServe's in-replica scheduling). Pure.

The queue holds calls per expert with their arrival times. `next_batch` picks one expert and how many of its calls
to run now:
- arrange: calls of one expert go together; an expert already on the device goes before one that needs a switch
  (and among those, the largest group first, so a switch, when one is needed, is paid for by the most calls) - unless
  some call has waited `max_wait_s`, when the expert of the oldest call goes first (the wait is bounded);
- split: at most the expert's best batch (the profile's largest useful batch), and at most what the free device
  memory holds in activations (at least one call, so the queue always moves).
FCFS stays selectable as the baseline: calls in arrival order, a batch being the run of consecutive calls of one
expert. Dependent calls reach the
queue only after their upstream ran, so they follow it; the host runs them while the upstream's inputs are hot.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


class ArrangePolicy(str, enum.Enum):
    COSERVE = "coserve"
    FCFS = "fcfs"


@dataclass(frozen=True)
class NextBatch:
    expert: str
    num_calls: int
    reason: str  # oldest_waited | resident | largest | fcfs


def next_batch(policy: ArrangePolicy, queue: Mapping[str, Sequence[float]], resident: Collection[str], now_s: float, *,
               max_wait_s: float, max_batch: Mapping[str, int], free_bytes: int | None = None,
               activation_bytes: Mapping[str, int] | None = None) -> NextBatch | None:
    """The next batch to run, or None when nothing is queued. `queue`: expert -> arrival times of its calls."""
    waiting = {e: sorted(times) for e, times in queue.items() if times}
    if not waiting:
        return None
    oldest = min(waiting, key=lambda e: (waiting[e][0], e))
    if policy is ArrangePolicy.FCFS:
        expert, reason = oldest, "fcfs"
    elif now_s - waiting[oldest][0] >= max_wait_s:
        expert, reason = oldest, "oldest_waited"
    else:
        on_device = [e for e in waiting if e in set(resident)]
        pool, reason = (on_device, "resident") if on_device else (list(waiting), "largest")
        expert = max(pool, key=lambda e: (len(waiting[e]), -waiting[e][0], e))
    n = len(waiting[expert])
    if policy is ArrangePolicy.FCFS:  # in arrival order: only the run of this expert's calls before another's
        arrivals = sorted((t, e) for e, times in waiting.items() for t in times)
        n = next((i for i, (_, e) in enumerate(arrivals) if e != expert), len(arrivals))
    n = min(n, max(1, max_batch.get(expert, n)))
    if free_bytes is not None and activation_bytes and activation_bytes.get(expert, 0) > 0:
        n = max(1, min(n, free_bytes // activation_bytes[expert]))
    return NextBatch(expert, n, reason)
