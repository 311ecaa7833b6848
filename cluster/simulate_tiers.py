"""Memory tiers of the simulator: each executor's pool held exactly as a pooled host replica holds it. Pure.

Every expert is on disk. An executor's pool has a device budget and a host-memory budget of its own (one pooled host
replica's `device_budget_bytes` / `host_budget_bytes`) and the tiers are inclusive, as in `experts.runtime`: an
expert on the device keeps its host copy while the host budget allows, so leaving the device costs nothing and coming
back is one copy from host memory. What moves is decided by the pooled host's own code, called here, not
re-implemented: the warm start by `experts.tiering.warm_plan`, room for a switch by `experts.tiering.make_room` on a
snapshot built by `experts.tiering.pool_snapshot` (evictions in the policy's order - queued experts protected under
every policy, as on the host - and which host copies to drop, least used first under CoServe, least recently used
under the baselines), and a prefetch's room by `experts.prefetch`. A load comes from host memory when the pool holds a
copy, else from disk. The tiers count what moved and record their peaks, so a test can check no budget was ever
exceeded.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from expertmesh.experts.eviction import EvictionPolicy
from expertmesh.experts.tiering import RoomPlan, make_room, pool_snapshot, warm_plan


class Tier(str, enum.Enum):
    HOST = "host"
    DISK = "disk"


@dataclass
class SimPool:
    """One executor's experts: on the device (expert -> (loaded at, last used), ms) and with a host copy."""

    device_budget_bytes: int
    host_budget_bytes: int | None  # None: no limit
    device: dict[str, tuple[float, float]] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)  # expert -> last used (ms)
    device_used_bytes: int = 0
    host_used_bytes: int = 0
    peak_device_bytes: int = 0
    peak_host_bytes: int = 0

    @property
    def resident(self) -> dict[str, tuple[float, float]]:
        return self.device

    @property
    def budget_bytes(self) -> int:
        return self.device_budget_bytes

    @property
    def used_bytes(self) -> int:
        return self.device_used_bytes

    def note_peaks(self) -> None:
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_used_bytes)
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_used_bytes)


@dataclass
class Tiers:
    pools: list[SimPool]
    sizes: Mapping[str, int]
    usage: Mapping[str, float] = field(default_factory=dict)
    loads: Counter = field(default_factory=Counter)  # Tier -> switches (on-demand loads onto a device) from it
    prefetches: Counter = field(default_factory=Counter)  # Tier -> prefetch loads from it
    demotions_to_host: int = 0  # device evictions that kept a host copy
    dropped_to_disk: int = 0  # device evictions without a host copy, and host copies dropped
    evictions: Counter = field(default_factory=Counter)  # device evictions by reason
    peak_device_bytes: int = 0  # every pool together

    # ------------------------------------------------------------------ reading
    def source(self, pool_index: int, expert: str) -> Tier:
        """Where a load of `expert` onto pool `pool_index`'s device would come from now."""
        return Tier.HOST if expert in self.pools[pool_index].host else Tier.DISK

    def source_anywhere(self, expert: str) -> Tier:
        return Tier.HOST if any(expert in p.host for p in self.pools) else Tier.DISK

    @property
    def peak_pool_bytes(self) -> list[int]:
        return [p.peak_device_bytes for p in self.pools]

    @property
    def peak_host_bytes(self) -> int:
        return sum(p.peak_host_bytes for p in self.pools)

    # ------------------------------------------------------------------ moves
    def warm(self, pool_index: int, experts: Collection[str], now_ms: float) -> None:
        """The pool's warm start (`experts.tiering.warm_plan`, nothing counted): what a host replica holds once
        configured. Less used means used longer ago."""
        pool = self.pools[pool_index]
        plan = warm_plan(list(experts), self.sizes, self.usage, device_budget_bytes=pool.device_budget_bytes,
                         host_budget_bytes=pool.host_budget_bytes, on_device=pool.device, in_host=pool.host)
        order = {e: rank for rank, e in enumerate(sorted(experts, key=lambda e: (-self.usage.get(e, 0.0), e)))}
        for e in plan.device:
            if e not in pool.device:
                t = now_ms - 1e-3 * (order.get(e, 0) + 1)
                pool.device[e] = (t, t)
                pool.device_used_bytes += self.sizes[e]
        for e in plan.host:
            if e not in pool.host:
                pool.host[e] = now_ms - 1e-3 * (order.get(e, 0) + 1)
                pool.host_used_bytes += self.sizes[e]
        self._note_peaks(pool)

    def room(self, pool_index: int, policy: EvictionPolicy, expert: str, *, busy: Collection[str],
             running: Collection[str], upstreams: Mapping[str, Collection[str]]) -> RoomPlan | None:
        """What the pooled host would move to load `expert` here (`experts.tiering.make_room`); None: it cannot fit."""
        pool = self.pools[pool_index]
        last_used = {e: used / 1000.0 for e, (_, used) in pool.device.items()} | {
            e: used / 1000.0 for e, used in pool.host.items() if e not in pool.device}
        loaded = {e: at / 1000.0 for e, (at, _) in pool.device.items()}
        snap = pool_snapshot(self.sizes, list(pool.device), list(pool.host), last_used, loaded, self.usage, busy=busy,
                             device_budget_bytes=pool.device_budget_bytes, host_budget_bytes=pool.host_budget_bytes,
                             running=running)
        return make_room(policy, snap, expert, self.sizes[expert], in_host=expert in pool.host, upstreams=upstreams)

    def load(self, pool_index: int, expert: str, plan: RoomPlan, now_ms: float) -> Tier:
        """Apply `plan` (evictions, host copies dropped) and put `expert` on the pool's device; returns where it came
        from. The copy read from disk stays in host memory when the plan keeps it."""
        pool = self.pools[pool_index]
        for ev in plan.evictions:
            _, used = pool.device.pop(ev.expert)
            pool.device_used_bytes -= self.sizes[ev.expert]
            self.evictions[ev.reason.value] += 1
            if ev.expert in pool.host:
                pool.host[ev.expert] = max(pool.host[ev.expert], used)
                self.demotions_to_host += 1
            else:
                self.dropped_to_disk += 1
        for victim in plan.host_drops:
            del pool.host[victim]
            pool.host_used_bytes -= self.sizes[victim]
            self.dropped_to_disk += 1
        return self._put(pool, expert, now_ms, keep_host_copy=plan.keep_host_copy)

    def prefetch_load(self, pool_index: int, expert: str, now_ms: float) -> Tier:
        """A prefetch into free device memory (no eviction), keeping the host copy while the host budget holds it."""
        pool = self.pools[pool_index]
        keep = pool.host_budget_bytes is None or pool.host_used_bytes + self.sizes[expert] <= pool.host_budget_bytes
        return self._put(pool, expert, now_ms, keep_host_copy=keep, count=self.prefetches)

    def _put(self, pool: SimPool, expert: str, now_ms: float, *, keep_host_copy: bool,
             count: Counter | None = None) -> Tier:
        if expert in pool.device:
            raise ValueError(f"{expert} is already on this pool's device")
        if pool.device_used_bytes + self.sizes[expert] > pool.device_budget_bytes:
            raise ValueError(f"loading {expert} would put a pool over its device budget of "
                             f"{pool.device_budget_bytes} bytes; make room first")
        tier = Tier.HOST if expert in pool.host else Tier.DISK
        pool.device[expert] = (now_ms, now_ms)
        pool.device_used_bytes += self.sizes[expert]
        if tier is Tier.DISK and keep_host_copy:
            pool.host[expert] = now_ms
            pool.host_used_bytes += self.sizes[expert]
        (self.loads if count is None else count)[tier] += 1
        self._note_peaks(pool)
        return tier

    def touch(self, pool_index: int, expert: str, now_ms: float) -> None:
        pool = self.pools[pool_index]
        loaded, _ = pool.device[expert]
        pool.device[expert] = (loaded, now_ms)
        if expert in pool.host:
            pool.host[expert] = now_ms

    def _note_peaks(self, pool: SimPool) -> None:
        pool.note_peaks()
        if pool.host_budget_bytes is not None and pool.host_used_bytes > pool.host_budget_bytes:
            raise ValueError(f"a pool holds {pool.host_used_bytes} bytes of host copies, over its host budget of "
                             f"{pool.host_budget_bytes}")
        self.peak_device_bytes = max(self.peak_device_bytes, sum(p.device_used_bytes for p in self.pools))
