"""Memory tiers of the simulator: executors' device pools, the host-memory tier and disk, with their budgets. Pure.

Every expert is on disk. An executor's device pool holds the experts it can run without a switch, within its
budget. The host tier (one per machine, shared by its executors) takes experts evicted from a device pool while its
budget allows; to make room it drops host copies by the rule the pooled hosts use, `experts.tiering.make_room`
(called here, not re-implemented): under CoServe eviction the least likely to be used first (the usage probability;
ties: least recently used), under the LRU and FIFO baselines the least recently used first; never the copy of an
expert still on a device; when even dropping every other copy leaves too little room, nothing is dropped and the
evicted expert is only on disk. An expert loaded from the host tier moves out of it onto the device (the tiers are
exclusive here: device + host hold the most; the pooled hosts keep a host copy of a device expert while the host
budget allows). A load comes from the host tier when the expert is there, else from disk. The tiers count what moved
and record their peak use, so a test can check no budget was ever exceeded.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from expertmesh.experts.eviction import EvictionPolicy, ResidentExpert
from expertmesh.experts.tiering import HostCopy, PoolSnapshot, make_room


class Tier(str, enum.Enum):
    HOST = "host"
    DISK = "disk"


@dataclass
class DevicePool:
    """One executor's experts on the device: expert -> (loaded at, last used), in ms of the simulated clock."""

    budget_bytes: int
    resident: dict[str, tuple[float, float]] = field(default_factory=dict)
    used_bytes: int = 0


@dataclass
class Tiers:
    pools: list[DevicePool]
    host_budget_bytes: int
    host_policy: EvictionPolicy = EvictionPolicy.LRU  # whose rule drops host copies (experts/tiering.py)
    usage: Mapping[str, float] = field(default_factory=dict)  # expert -> probability a request calls it
    host: dict[str, tuple[int, float]] = field(default_factory=dict)  # expert -> (bytes, last used ms)
    host_used_bytes: int = 0
    peak_device_bytes: int = 0  # all pools together
    peak_pool_bytes: list[int] = field(default_factory=list)
    peak_host_bytes: int = 0
    loads: Counter = field(default_factory=Counter)  # Tier -> loads onto a device from it
    demotions_to_host: int = 0  # device evictions that went to the host tier
    dropped_to_disk: int = 0  # device evictions the host tier could not take, and host-tier evictions

    def __post_init__(self) -> None:
        self.peak_pool_bytes = [p.used_bytes for p in self.pools]
        self._note_peaks()

    def source(self, expert: str) -> Tier:
        """Where a load of `expert` onto a device would come from now."""
        return Tier.HOST if expert in self.host else Tier.DISK

    def claim(self, expert: str) -> Tier:
        """Where a load of `expert` comes from, decided before room is made on the device: out of the host tier if
        it is there (so the evictions that make room cannot push it to disk first), else disk."""
        tier = self.source(expert)
        if tier is Tier.HOST:
            self.host_used_bytes -= self.host.pop(expert)[0]
        return tier

    def load(self, pool_index: int, expert: str, num_bytes: int, now_ms: float, tier: Tier) -> None:
        """Put `expert`, claimed from `tier`, in a pool the caller made room in."""
        pool = self.pools[pool_index]
        if expert in pool.resident:
            raise ValueError(f"{expert} is already in pool {pool_index}")
        if pool.used_bytes + num_bytes > pool.budget_bytes:
            raise ValueError(f"loading {expert} would put pool {pool_index} over its budget of "
                             f"{pool.budget_bytes} bytes; evict first")
        pool.resident[expert] = (now_ms, now_ms)
        pool.used_bytes += num_bytes
        self.loads[tier] += 1
        self._note_peaks()

    def place(self, pool_index: int, expert: str, num_bytes: int, last_used_ms: float) -> None:
        """A warm start: `expert` is in the pool before the clock starts (no load is counted)."""
        pool = self.pools[pool_index]
        pool.resident[expert] = (last_used_ms, last_used_ms)
        pool.used_bytes += num_bytes
        self._note_peaks()

    def stock_host(self, expert: str, num_bytes: int, last_used_ms: float) -> bool:
        """A warm start: `expert` is in the host tier before the clock starts, if it still fits (nothing counted)."""
        if expert in self.host or self.host_used_bytes + num_bytes > self.host_budget_bytes:
            return False
        self.host[expert] = (num_bytes, last_used_ms)
        self.host_used_bytes += num_bytes
        self._note_peaks()
        return True

    def touch(self, pool_index: int, expert: str, now_ms: float) -> None:
        loaded, _ = self.pools[pool_index].resident[expert]
        self.pools[pool_index].resident[expert] = (loaded, now_ms)

    def evict(self, pool_index: int, expert: str, num_bytes: int) -> Tier:
        """Take `expert` off a device pool: into the host tier when it fits there (dropping host copies by the
        host policy's rule), else it is only on disk. Returns where it went."""
        pool = self.pools[pool_index]
        _, last_used_ms = pool.resident.pop(expert)
        pool.used_bytes -= num_bytes
        return self.demote(expert, num_bytes, last_used_ms)

    def demote(self, expert: str, num_bytes: int, last_used_ms: float) -> Tier:
        """`expert` (last used at `last_used_ms`) leaves a device: keep it in the host tier if
        `experts.tiering.make_room` finds room there, dropping the host copies it names."""
        if expert in self.host:  # already there (another pool held it too): its last use is the later one
            held, used_ms = self.host[expert]
            self.host[expert] = (held, max(used_ms, last_used_ms))
            return Tier.HOST
        plan = make_room(self.host_policy, self._host_snapshot(), expert, num_bytes, in_host=False, upstreams={})
        if plan is None or not plan.keep_host_copy:  # (None only for a device budget, and there is none here)
            self.dropped_to_disk += 1
            return Tier.DISK
        for victim in plan.host_drops:
            self.host_used_bytes -= self.host.pop(victim)[0]
            self.dropped_to_disk += 1
        self.host[expert] = (num_bytes, last_used_ms)
        self.host_used_bytes += num_bytes
        self.demotions_to_host += 1
        self._note_peaks()
        return Tier.HOST

    def _host_snapshot(self) -> PoolSnapshot:
        """The host tier as `experts.tiering` sees a pool (times in s): its copies, and as the device the experts
        on a device pool that also have a host copy (the only ones its rule looks at: their copies are kept). No
        device budget: only the host tier's room is asked for."""
        last_use_ms: dict[str, float] = {}
        for pool in self.pools:
            for e, (_, used_ms) in pool.resident.items():
                if e in self.host:
                    last_use_ms[e] = max(used_ms, last_use_ms.get(e, used_ms))
        device = [ResidentExpert(e, self.host[e][0], used_ms / 1000.0, used_ms / 1000.0,
                                 usage=self.usage.get(e, 0.0)) for e, used_ms in last_use_ms.items()]
        host = [HostCopy(e, num_bytes, used_ms / 1000.0, self.usage.get(e, 0.0))
                for e, (num_bytes, used_ms) in self.host.items()]
        return PoolSnapshot(device, host, device_budget_bytes=None, host_budget_bytes=self.host_budget_bytes)

    def _note_peaks(self) -> None:
        self.peak_device_bytes = max(self.peak_device_bytes, sum(p.used_bytes for p in self.pools))
        self.peak_pool_bytes = [max(a, p.used_bytes) for a, p in zip(self.peak_pool_bytes, self.pools)]
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_used_bytes)
