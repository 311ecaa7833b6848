"""What planning needs of one expert, from its profile: bytes, activations, K*n + B at the serving batch, switch
times and the calls the plan puts on a node (`cluster.demand.expert_cost` makes it from a profile entry)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ExpertCost(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    weights_bytes: int = Field(ge=0)
    activation_bytes: int = Field(ge=0, description="one batch's activations at the serving batch size")
    k_ms_per_item: float = Field(ge=0)
    b_ms_per_batch: float = Field(ge=0)
    batch_size: int = Field(ge=1)
    switch_ms: float = Field(ge=0, description="host memory -> device")
    disk_switch_ms: float = Field(0.0, ge=0, description="disk -> device (disk -> host + host -> device); 0: unknown")
    calls_per_s: float = Field(ge=0, description="planned calls per second on this node")
