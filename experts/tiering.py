"""Making room for an expert on a pool's device, within its device and host-memory budgets. Pure.

A pooled host holds experts in three tiers (`experts.runtime`): the device (models ready to run), host memory (a
copy of the weights, inclusive: an expert on the device keeps its host copy while the host budget allows) and disk
(everything). Before an expert's batch runs, `make_room` decides, from a snapshot, what moves:
- which experts leave the device (`experts.eviction.choose_evictions` in the pool's policy). Experts with queued or
  running work are kept; if that leaves too little, experts with only queued work may go (never the running one,
  never the incoming one): a pool must not stall because every resident expert has a queue. None when even that
  cannot make room (a single expert larger than the budget: the caller reports it);
- whether the incoming expert's weights, read from disk, are kept in host memory: yes when the host budget holds
  them after dropping host copies of experts that are not on the device - under the CoServe policy the least likely
  to be used per byte first (the usage probability over the bytes; ties: least recently used), so the host tier keeps
  the experts a request is likely to need; under the LRU and FIFO baselines the least recently used first.
An expert leaving the device keeps its host copy when it has one (it is already counted in the host budget), else
goes to disk. A budget of None is unlimited.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from expertmesh.experts.eviction import Eviction, EvictionPolicy, ResidentExpert, choose_evictions


@dataclass(frozen=True)
class HostCopy:
    name: str
    num_bytes: int
    last_used_s: float
    usage: float = 0.0  # probability a request calls it


@dataclass(frozen=True)
class PoolSnapshot:
    device: Sequence[ResidentExpert]  # on the device (busy: queued or running work)
    host: Sequence[HostCopy]  # experts with a copy in host memory (those on the device included)
    device_budget_bytes: int | None
    host_budget_bytes: int | None
    running: frozenset[str] = frozenset()  # the experts whose batch runs now: never evicted

    @property
    def device_bytes(self) -> int:
        return sum(e.num_bytes for e in self.device)

    @property
    def host_bytes(self) -> int:
        return sum(h.num_bytes for h in self.host)


@dataclass(frozen=True)
class RoomPlan:
    evictions: tuple[Eviction, ...] = ()  # leave the device, in this order
    host_drops: tuple[str, ...] = ()  # host copies dropped to keep the incoming expert's weights
    keep_host_copy: bool = True  # keep the incoming expert's weights in host memory (only matters when read from disk)


def make_room(policy: EvictionPolicy, snap: PoolSnapshot, expert: str, num_bytes: int, *, in_host: bool,
              upstreams: Mapping[str, Collection[str]]) -> RoomPlan | None:
    """What to move so that `expert` (`num_bytes`, with a host copy or not) fits on the device; None if it cannot."""
    evictions: list[Eviction] = []
    if snap.device_budget_bytes is not None:
        if num_bytes > snap.device_budget_bytes:
            return None
        free = snap.device_budget_bytes - snap.device_bytes
        chosen = choose_evictions(policy, snap.device, upstreams, need_bytes=num_bytes, free_bytes=free,
                                  protect={expert} | snap.running)
        if chosen is None:  # every resident expert has work queued: let queued (not running) ones go
            idle = [replace(e, busy=False) for e in snap.device]
            chosen = choose_evictions(policy, idle, upstreams, need_bytes=num_bytes, free_bytes=free,
                                      protect={expert} | snap.running)
        if chosen is None:
            return None
        evictions = chosen
    if in_host:
        return RoomPlan(tuple(evictions))
    drops = _host_drops(policy, snap, expert, num_bytes, leaving={e.expert for e in evictions})
    if drops is None:
        return RoomPlan(tuple(evictions), keep_host_copy=False)
    return RoomPlan(tuple(evictions), tuple(drops))


def _host_drops(policy: EvictionPolicy, snap: PoolSnapshot, expert: str, num_bytes: int,
                leaving: set[str]) -> list[str] | None:
    """The host copies of experts off the device to drop so `num_bytes` more fit (CoServe: least used first, else
    least recently used first); None if the host budget cannot hold them even then."""
    if snap.host_budget_bytes is None:
        return []
    if num_bytes > snap.host_budget_bytes:
        return None
    free = snap.host_budget_bytes - snap.host_bytes
    on_device = {e.name for e in snap.device} - leaving
    drops: list[str] = []
    if policy is EvictionPolicy.COSERVE:
        order = sorted(snap.host, key=lambda h: (h.usage / max(h.num_bytes, 1), h.last_used_s, h.name))
    else:
        order = sorted(snap.host, key=lambda h: (h.last_used_s, h.name))
    for copy in order:
        if free >= num_bytes:
            break
        if copy.name in on_device or copy.name == expert:
            continue
        drops.append(copy.name)
        free += copy.num_bytes
    return drops if free >= num_bytes else None


def pool_snapshot(sizes: Mapping[str, int], on_device: Collection[str], in_host: Collection[str],
                  last_used_s: Mapping[str, float], loaded_s: Mapping[str, float], usage: Mapping[str, float], *,
                  busy: Collection[str], device_budget_bytes: int | None, host_budget_bytes: int | None,
                  running: Collection[str] = ()) -> PoolSnapshot:
    """A pool as `make_room` reads it, from what it holds: the pooled host's executor and the simulator both build
    their snapshot here, so the two make room by the same code (`busy`: experts with queued work)."""
    busy = set(busy)
    device = [ResidentExpert(e, sizes[e], last_used_s.get(e, 0.0), loaded_s.get(e, 0.0), busy=e in busy,
                             usage=usage.get(e, 0.0)) for e in on_device]
    host = [HostCopy(e, sizes[e], last_used_s.get(e, 0.0), usage.get(e, 0.0)) for e in in_host]
    return PoolSnapshot(device, host, device_budget_bytes, host_budget_bytes, running=frozenset(running))


@dataclass(frozen=True)
class WarmPlan:
    """Where a pool puts its experts when it is (re)configured: onto the device, a copy in host memory, or neither
    (loaded on demand from disk). `device` and `host` may overlap (the tiers are inclusive)."""

    device: tuple[str, ...]  # loaded onto the device, most used first
    host: tuple[str, ...]  # holding a host-memory copy afterwards (device experts included while the budget holds them)

    def on_demand(self, experts: Collection[str]) -> list[str]:
        held = set(self.device) | set(self.host)
        return [e for e in experts if e not in held]


def warm_plan(experts: Sequence[str], sizes: Mapping[str, int], usage: Mapping[str, float], *,
              device_budget_bytes: int | None, host_budget_bytes: int | None,
              on_device: Collection[str] = (), in_host: Collection[str] = ()) -> WarmPlan:
    """The pool's warm-up: the most used experts per byte onto the device while the device budget holds them (the
    knapsack's greedy order: the most calls that start without a switch); then host-memory copies while the host
    budget holds them - first of the experts left off the device (each one there turns a disk read into a copy), then
    of the device's own (each one there makes its eviction free), most used per byte first. The rest stay on disk.
    What the pool holds already counts against the budgets and stays. One rule for the pooled host's `warm`, the
    simulator's warm start and the planner's per-node tiers."""
    device, host = set(on_device), set(in_host)
    device_used = sum(sizes[e] for e in device)
    host_used = sum(sizes[e] for e in host)

    def fits(budget: int | None, used: int, e: str) -> bool:
        return budget is None or used + sizes[e] <= budget
    ranked = sorted(experts, key=lambda e: (-usage.get(e, 0.0) / max(sizes[e], 1), e))
    for e in ranked:
        if e not in device and fits(device_budget_bytes, device_used, e):
            device.add(e)
            device_used += sizes[e]
    for e in [e for e in ranked if e not in device] + [e for e in ranked if e in device]:
        if e not in host and fits(host_budget_bytes, host_used, e):
            host.add(e)
            host_used += sizes[e]
    order = sorted(set(experts) | device | host, key=lambda e: (-usage.get(e, 0.0), e))
    return WarmPlan(tuple(e for e in order if e in device), tuple(e for e in order if e in host))
