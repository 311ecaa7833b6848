"""Which resident experts leave a device to make room for another: dependency-aware eviction (CoServe), pure.

A pooled host whose device budget cannot take the next expert asks `choose_evictions` which resident experts to
drop, given a snapshot of what is resident (bytes, last use, load time, queued or running work, usage probability)
and the dependency graph (each expert's upstream experts). The CoServe policy evicts in two stages:
1. downstream experts none of whose upstream experts is resident, largest first - nothing resident can trigger them
   soon, and the largest frees the most with one eviction;
2. then the lowest usage probability per byte first (ties: least recently used). CoServe ranks by usage alone; with
   experts two orders of magnitude apart in size (tiny component experts, ResNet-18-class detectors) that evicts
   dozens of small experts - each a later switch - to free the room of one large one, so ExpertMesh ranks by what an
   eviction costs per byte it frees (the knapsack's greedy order).
An expert with queued or running work, or one the caller protects (the experts of the batch being made room for),
is never chosen. LRU (least recently used first) and FIFO (first loaded first) stay selectable as baselines.
The decision is the list of evictions, each with its reason (the metric label), or None when even every evictable
expert would not free enough: the caller then waits for work to finish rather than overrun its budget.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


class EvictionPolicy(str, enum.Enum):
    COSERVE = "coserve"
    LRU = "lru"
    FIFO = "fifo"


class EvictionReason(str, enum.Enum):
    ORPHANED_DOWNSTREAM = "orphaned_downstream"  # a downstream expert with no resident upstream
    LOW_USAGE = "low_usage"
    LRU = "lru"
    FIFO = "fifo"


@dataclass(frozen=True)
class ResidentExpert:
    name: str
    num_bytes: int
    last_used_s: float  # clock reading of its last batch (or its load, before any)
    loaded_s: float  # clock reading of its load
    busy: bool = False  # queued or running work: never evicted
    usage: float = 0.0  # probability a request calls it (the profile's usage weights)


@dataclass(frozen=True)
class Eviction:
    expert: str
    num_bytes: int
    reason: EvictionReason


def _coserve_order(candidates: list[ResidentExpert], resident: set[str],
                   upstreams: Mapping[str, Collection[str]]) -> list[tuple[ResidentExpert, EvictionReason]]:
    orphaned = [e for e in candidates if upstreams.get(e.name) and not set(upstreams[e.name]) & resident]
    first = sorted(orphaned, key=lambda e: (-e.num_bytes, e.last_used_s, e.name))
    rest = sorted((e for e in candidates if e not in orphaned),
                  key=lambda e: (e.usage / max(e.num_bytes, 1), e.last_used_s, e.name))
    return ([(e, EvictionReason.ORPHANED_DOWNSTREAM) for e in first]
            + [(e, EvictionReason.LOW_USAGE) for e in rest])


def eviction_order(policy: EvictionPolicy, resident: Sequence[ResidentExpert],
                   upstreams: Mapping[str, Collection[str]], protect: Collection[str] = ()
                   ) -> list[tuple[ResidentExpert, EvictionReason]]:
    """Every evictable resident expert, in the order `policy` would evict them, with the reason for each."""
    candidates = [e for e in resident if not e.busy and e.name not in set(protect)]
    if policy is EvictionPolicy.LRU:
        return [(e, EvictionReason.LRU) for e in sorted(candidates, key=lambda e: (e.last_used_s, e.name))]
    if policy is EvictionPolicy.FIFO:
        return [(e, EvictionReason.FIFO) for e in sorted(candidates, key=lambda e: (e.loaded_s, e.name))]
    return _coserve_order(candidates, {e.name for e in resident}, upstreams)


def choose_evictions(policy: EvictionPolicy, resident: Sequence[ResidentExpert],
                     upstreams: Mapping[str, Collection[str]], *, need_bytes: int, free_bytes: int,
                     protect: Collection[str] = ()) -> list[Eviction] | None:
    """The fewest evictions, in `policy`'s order, that bring `free_bytes` to at least `need_bytes`: [] when it fits
    already; None when evicting every evictable expert would still not make room (wait, do not overrun the budget).

    The CoServe order is re-read after each eviction: evicting an upstream expert can orphan its downstream experts,
    which then go before any other low-usage expert."""
    if need_bytes <= free_bytes:
        return []
    left = list(resident)
    out: list[Eviction] = []
    while free_bytes < need_bytes:
        order = eviction_order(policy, left, upstreams, protect)
        if not order:
            return None
        victim, reason = order[0]
        out.append(Eviction(victim.name, victim.num_bytes, reason))
        free_bytes += victim.num_bytes
        left = [e for e in left if e.name != victim.name]
    return out
