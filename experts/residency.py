"""Residency policy of one expert replica: when idle weights leave the device, then host memory.

Pure: `decide(snapshot, now_s)` takes the replica's tier and when it was last used, and returns the
tier to move down to (or None). The serving glue applies the decision with `ExpertRuntime` and,
when a request finds the expert below the device, loads it back and counts a switch - the inputs of
the hit rate. With both timeouts unset (the default) weights stay on the device for the replica's life.
A replica running a batch (from preprocessing to its results) is busy and never moved down.

`memory_budget_bytes` (pure) says what a node offers experts, per tier: the number behind the
`expertmesh_node_memory_budget_bytes` gauge.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from expertmesh.experts.runtime import Tier


class ResidencyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_idle_s: float | None = Field(None, gt=0, description="idle this long on the device -> move to host memory")
    host_idle_s: float | None = Field(None, gt=0, description="idle this long (since last use) -> drop to disk")

    @model_validator(mode="after")
    def _ordered(self) -> ResidencyConfig:
        if self.device_idle_s is not None and self.host_idle_s is not None and self.host_idle_s < self.device_idle_s:
            raise ValueError(f"host_idle_s ({self.host_idle_s}) is below device_idle_s ({self.device_idle_s}); "
                             "fix: make host_idle_s at least device_idle_s (weights leave the device first)")
        return self

    @property
    def enabled(self) -> bool:
        return self.device_idle_s is not None or self.host_idle_s is not None


@dataclass(frozen=True)
class ResidencySnapshot:
    tier: Tier
    last_used_s: float  # clock reading of the last batch (or of the load, before any)
    busy: bool = False  # a batch is running: never moved down under it


def decide(config: ResidencyConfig, snap: ResidencySnapshot, now_s: float) -> Tier | None:
    """The tier to move down to now, or None to stay."""
    if snap.busy or snap.tier is Tier.DISK:
        return None
    idle_s = now_s - snap.last_used_s
    if config.host_idle_s is not None and idle_s >= config.host_idle_s:
        return Tier.DISK
    if snap.tier is Tier.DEVICE and config.device_idle_s is not None and idle_s >= config.device_idle_s:
        return Tier.HOST
    return None


def memory_budget_bytes(declared_mib: float | None, *, machine_bytes: int,
                        device_bytes: int | None) -> dict[Tier, int]:
    """Memory a node offers experts, by tier.

    The device tier gets what the node declares as its `expertmesh_memory_mib` Ray resource (what the placement
    planner fills with experts); a node that declares none (or 0) falls back to the whole device: `device_bytes`
    (a GPU's memory) or, on a CPU node (`device_bytes` None), `machine_bytes`. The host tier: on a CPU node the
    device is host memory, so the same budget; on a GPU node nothing declares a host budget, so the machine's memory.
    """
    if declared_mib is not None and declared_mib < 0:
        raise ValueError(f"expertmesh_memory_mib is {declared_mib}; "
                         "fix: declare the MiB the node offers experts (>= 0)")
    if declared_mib:
        device = int(declared_mib * 2**20)
    else:
        device = device_bytes if device_bytes is not None else machine_bytes
    host = device if device_bytes is None else machine_bytes
    return {Tier.HOST: host, Tier.DEVICE: device}
