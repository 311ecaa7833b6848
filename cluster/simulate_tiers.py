"""Memory tiers of the simulator: executors' device pools, the host-memory tier and disk, with their budgets. Pure.

Every expert is on disk. An executor's device pool holds the experts it can run without a switch, within its
budget. The host tier (one per machine, shared by its executors) holds experts evicted from a device pool while
its budget allows, making room by dropping its least recently used experts (they stay on disk); an expert loaded
from the host tier moves out of it onto the device (the tiers are exclusive: device + host hold the most). A load
comes from the host tier when the expert is there, else from disk. The tiers count what moved and record their
peak use, so a test can check no budget was ever exceeded.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict
from dataclasses import dataclass, field


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
    host_usage: dict[str, float] | None = None  # given: the host tier keeps the most used (else LRU)
    host: OrderedDict[str, int] = field(default_factory=OrderedDict)  # expert -> bytes, least recently used first
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
            self.host_used_bytes -= self.host.pop(expert)
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

    def stock_host(self, expert: str, num_bytes: int) -> bool:
        """A warm start: `expert` is in the host tier before the clock starts, if it still fits (nothing counted)."""
        if expert in self.host or self.host_used_bytes + num_bytes > self.host_budget_bytes:
            return False
        self.host[expert] = num_bytes
        self.host_used_bytes += num_bytes
        self._note_peaks()
        return True

    def touch(self, pool_index: int, expert: str, now_ms: float) -> None:
        loaded, _ = self.pools[pool_index].resident[expert]
        self.pools[pool_index].resident[expert] = (loaded, now_ms)

    def evict(self, pool_index: int, expert: str, num_bytes: int) -> Tier:
        """Take `expert` off a device pool: into the host tier when it fits there (dropping the host tier's least
        recently used experts to make room), else it is only on disk. Returns where it went."""
        pool = self.pools[pool_index]
        del pool.resident[expert]
        pool.used_bytes -= num_bytes
        return self.demote(expert, num_bytes)

    def demote(self, expert: str, num_bytes: int) -> Tier:
        if expert in self.host:  # already there (another pool held it too): now the most recently used
            self.host.move_to_end(expert)
            return Tier.HOST
        if num_bytes > self.host_budget_bytes:
            self.dropped_to_disk += 1
            return Tier.DISK
        if self.host_usage is not None and not self._room_by_usage(expert, num_bytes):
            self.dropped_to_disk += 1
            return Tier.DISK
        while self.host_used_bytes + num_bytes > self.host_budget_bytes:
            _, freed = self.host.popitem(last=False)
            self.host_used_bytes -= freed
            self.dropped_to_disk += 1
        self.host[expert] = num_bytes
        self.host_used_bytes += num_bytes
        self.demotions_to_host += 1
        self._note_peaks()
        return Tier.HOST

    def _room_by_usage(self, expert: str, num_bytes: int) -> bool:
        """Usage order: drop the least used host experts while they are less used than `expert`; False (nothing
        dropped) when that does not make room."""
        usage = self.host_usage or {}
        mine = usage.get(expert, 0.0)
        victims, room = [], self.host_budget_bytes - self.host_used_bytes
        for e in sorted(self.host, key=lambda e: (usage.get(e, 0.0), e)):
            if room >= num_bytes or usage.get(e, 0.0) >= mine:
                break
            victims.append(e)
            room += self.host[e]
        if room < num_bytes:
            return False
        for e in victims:
            self.host_used_bytes -= self.host.pop(e)
            self.dropped_to_disk += 1
        return True

    def _note_peaks(self) -> None:
        self.peak_device_bytes = max(self.peak_device_bytes, sum(p.used_bytes for p in self.pools))
        self.peak_pool_bytes = [max(a, p.used_bytes) for a, p in zip(self.peak_pool_bytes, self.pools)]
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_used_bytes)
