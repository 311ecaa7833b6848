"""Per-factory quotas, configured beside the tokens: a rate (token bucket), a concurrency bound and a fair-share
weight. Pure: the clock is passed in.

The tokens file keeps its flat form (`token: factory_id` lines: no quotas, weight 1), or takes this one:

    tokens:
      <token of 16+ characters>: factory-a
    quotas:
      default:   {rate_per_s: 50, burst: 100, max_in_flight: 64, weight: 1}   # every factory not listed
      factory-a: {rate_per_s: 20, max_in_flight: 16, weight: 2}

A request past its factory's rate or concurrency is refused with RESOURCE_EXHAUSTED (HTTP 429) naming the factory
and the limit; the weight is the factory's share of the ingress when it is contended (`deployments.admission`).
A board counts as its number of components against both bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from expertmesh.deployments.factory_table import FactoryTable
from expertmesh.errors import ResourceExhausted


class FactoryQuota(BaseModel):
    """One factory's limits; every bound unset means unlimited (then only the ingress's capacity and fair share
    apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_per_s: float | None = Field(None, gt=0, description="components per second, sustained (token bucket)")
    burst: float | None = Field(None, ge=1, description="components above the rate a factory may send at once; "
                                                         "default: one second of its rate")
    max_in_flight: int | None = Field(None, ge=1, description="components of this factory in flight at once")
    weight: float = Field(1.0, gt=0, le=1000, description="share of a contended ingress, relative to other factories")

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> FactoryQuota:
        if self.burst is not None and self.rate_per_s is None:
            raise ValueError(f"burst is {self.burst} but rate_per_s is not set; set rate_per_s too, or drop burst")
        return self

    @property
    def burst_components(self) -> float:
        return self.burst if self.burst is not None else max(1.0, self.rate_per_s or 0.0)


class QuotaTable(FactoryTable[FactoryQuota]):
    """factory -> quota, with `default` for every factory not listed: the file's `quotas:` section."""


@dataclass
class TokenBucket:
    """`rate_per_s` tokens a second up to `capacity`; a take that does not fit takes nothing."""

    rate_per_s: float
    capacity: float
    tokens: float
    stamp_s: float

    def take(self, num: float, now_s: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now_s - self.stamp_s) * self.rate_per_s)
        self.stamp_s = now_s
        if num <= self.tokens or (num > self.capacity and self.tokens >= self.capacity):  # a board over the burst
            self.tokens -= num  # goes when the bucket is full, and leaves it in debt
            return True
        return False

    def wait_s(self, num: float) -> float:
        """Seconds until `num` tokens are there (for the refusal's message)."""
        return max(0.0, (min(num, self.capacity) - self.tokens) / self.rate_per_s)


class RateLimits:
    """One token bucket per factory, following the quota table as it changes (a reloaded tokens file)."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, factory: str, num: int, quota: FactoryQuota, now_s: float) -> None:
        """Take `num` components from the factory's bucket, or raise RESOURCE_EXHAUSTED naming its rate."""
        if quota.rate_per_s is None:
            self._buckets.pop(factory, None)
            return
        bucket = self._buckets.get(factory)
        if bucket is None or bucket.rate_per_s != quota.rate_per_s or bucket.capacity != quota.burst_components:
            bucket = self._buckets[factory] = TokenBucket(quota.rate_per_s, quota.burst_components,
                                                          quota.burst_components, now_s)
        if not bucket.take(num, now_s):
            raise ResourceExhausted(
                f"factory {factory!r} is over its rate quota of {quota.rate_per_s:g} components/s "
                f"(burst {quota.burst_components:g})", field="factory_id",
                fix=f"retry after {bucket.wait_s(num):.2f} s with backoff, or ask the operator to raise the factory's "
                    f"rate_per_s")
