"""The throughput benchmark's arithmetic: what one sweep point measured, which rate to try next, and what a sweep
says (the highest rate holding a p99 target, the capacity). Pure: no Ray, no gRPC, no clock.

A point is an open-loop run at one offered rate: request i is sent at i / rate seconds whatever the server does.
Each request ends with a status code name ("OK", "RESOURCE_EXHAUSTED", ...), its latency (to its last byte: for a
board, the whole stream) and how many components it answered. A point is *saturated* when the server completed
less than `saturation_fraction` of what was offered.

The sweep doubles the rate from its start while the server keeps up (not saturated, no errors, p99 not exploding),
probes once past the last rate when nothing saturated the server yet (the capacity is measured where the server is
the limit), then fills in between the highest rate that held the target and the lowest that did not (geometric
midpoints).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

OK = "OK"
REFUSED = "RESOURCE_EXHAUSTED"
DEADLINE = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class RequestRecord:
    """One request of a point: when it was sent (s after the point's start), how long it took, how it ended."""

    sent_s: float
    latency_ms: float
    code: str
    num_components: int  # components answered (1 for a single Inspect that succeeded, the stream's items for a board)


@dataclass
class PointResult:
    """What one open-loop point measured. Rates are per second of requests (boards for boards); `*_components_*`
    count components. Latencies are of the requests that succeeded; refusals are timed separately."""

    offered_per_s: float
    num_sent: int
    sent_per_s: float  # what the load generator really sent (below offered when it could not keep up)
    num_ok: int
    achieved_per_s: float
    achieved_components_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors_by_code: dict[str, int] = field(default_factory=dict)
    refusal_p99_ms: float | None = None  # p99 of the time to a RESOURCE_EXHAUSTED answer
    duration_s: float = 0.0  # first send to last answer

    @property
    def num_errors(self) -> int:
        return sum(self.errors_by_code.values())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PointResult:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (numpy's linear interpolation) of `values`; None when there are none."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def num_requests_for(rate_per_s: float, point_s: float, min_requests: int) -> int:
    """Requests one point sends: `point_s` seconds of the rate, and at least `min_requests` (enough for a p99)."""
    if rate_per_s <= 0 or point_s < 0 or min_requests < 1:
        raise ValueError(f"rate_per_s ({rate_per_s}) must be > 0, point_s ({point_s}) >= 0, "
                         f"min_requests ({min_requests}) >= 1")
    return max(min_requests, math.ceil(rate_per_s * point_s))


def send_offsets_s(num_requests: int, rate_per_s: float) -> list[float]:
    """Open loop: request i is due i / rate seconds after the start."""
    return [i / rate_per_s for i in range(num_requests)]


def summarize_point(records: Sequence[RequestRecord], offered_per_s: float) -> PointResult:
    """One point's figures. Achieved throughput is the successful requests over the longer of the send window and
    the span of their answers: at a rate the server sustains that is the offered rate; past it, the server's rate."""
    if not records:
        raise ValueError("a point without requests has no figures")
    ok = [r for r in records if r.code == OK]
    send_window_s = len(records) / offered_per_s
    sent = sorted(r.sent_s for r in records)
    sent_span_s = sent[-1] - sent[0]
    sent_per_s = (len(records) - 1) / sent_span_s if len(records) > 1 and sent_span_s > 0 else offered_per_s
    done_s = sorted(r.sent_s + r.latency_ms / 1000.0 for r in ok)
    answer_span_s = done_s[-1] - done_s[0] if len(done_s) > 1 else 0.0
    span_s = max(send_window_s, answer_span_s)
    refusals = [r.latency_ms for r in records if r.code == REFUSED]
    return PointResult(
        offered_per_s=offered_per_s, num_sent=len(records), sent_per_s=sent_per_s, num_ok=len(ok),
        achieved_per_s=len(ok) / span_s, achieved_components_per_s=sum(r.num_components for r in ok) / span_s,
        p50_ms=percentile_ms([r.latency_ms for r in ok], 50), p99_ms=percentile_ms([r.latency_ms for r in ok], 99),
        errors_by_code=dict(sorted(Counter(r.code for r in records if r.code != OK).items())),
        refusal_p99_ms=percentile_ms(refusals, 99),
        duration_s=max(r.sent_s + r.latency_ms / 1000.0 for r in records) - sent[0])


@dataclass(frozen=True)
class SweepRule:
    """How one sweep runs: where it starts, how it grows, when it stops, and the latency target it is judged by."""

    start_per_s: float
    target_p99_ms: float
    growth_factor: float = 2.0
    saturation_fraction: float = 0.9  # achieved below this share of offered: saturated
    stop_p99_factor: float = 4.0  # stop ramping once p99 is past this many targets ...
    floor_p99_factor: float = 3.0  # ... and this many times the first point's p99 (not just a latency floor)
    max_ramp_points: int = 10
    max_fill_points: int = 2
    fill_ratio: float = 1.3  # fill in while the bracket's rates differ by more than this factor
    max_rate_per_s: float = 1e5

    def __post_init__(self) -> None:
        if self.start_per_s <= 0 or self.target_p99_ms <= 0 or self.growth_factor <= 1 or self.fill_ratio <= 1:
            raise ValueError("start_per_s and target_p99_ms must be > 0, growth_factor and fill_ratio > 1 "
                             f"(got {self.start_per_s}, {self.target_p99_ms}, {self.growth_factor}, {self.fill_ratio})")


def saturated(p: PointResult, rule: SweepRule) -> bool:
    return p.achieved_per_s < rule.saturation_fraction * p.offered_per_s


def meets_target(p: PointResult, rule: SweepRule) -> bool:
    """Held the target: every request answered, p99 within the target, and the offered rate sustained."""
    return p.num_errors == 0 and p.p99_ms is not None and p.p99_ms <= rule.target_p99_ms and not saturated(p, rule)


def keeps_ramping(p: PointResult, first: PointResult, rule: SweepRule) -> bool:
    """Worth doubling again: not saturated, no errors, and p99 not exploding. A p99 over `stop_p99_factor` targets
    stops the ramp only when it also grew past `floor_p99_factor` times the first point's (queueing, not a slow but
    steady server whose latency floor is above the target)."""
    if saturated(p, rule) or p.num_errors or p.p99_ms is None:
        return False
    exploding = p.p99_ms > rule.stop_p99_factor * rule.target_p99_ms and \
        p.p99_ms > rule.floor_p99_factor * (first.p99_ms or 0.0)
    return not exploding


def next_rate(points: Sequence[PointResult], rule: SweepRule) -> float | None:
    """The next rate to try after `points` (in the order they ran), or None when the sweep is done.

    Ramp (x growth_factor while `keeps_ramping`); one step down when the start was already past capacity; one
    capacity probe (x growth_factor above the highest rate) when no point saturated the server yet, so the capacity
    is measured where the server is the limit; then up to `max_fill_points` midpoints of the target bracket."""
    if not points:
        return rule.start_per_s
    ramp = _ramp(points, rule)
    rates = [p.offered_per_s for p in points]
    if len(ramp) == len(points):
        last = ramp[-1]
        if keeps_ramping(last, ramp[0], rule) and len(ramp) < rule.max_ramp_points \
                and last.offered_per_s * rule.growth_factor <= rule.max_rate_per_s:
            return last.offered_per_s * rule.growth_factor
        if len(ramp) == 1 and not meets_target(ramp[0], rule) and (saturated(ramp[0], rule) or ramp[0].num_errors):
            return rule.start_per_s / rule.growth_factor  # the start was past capacity: one step down
    probe = max(rates) * rule.growth_factor
    if len(ramp) == len(points) and not any(saturated(p, rule) or p.num_errors for p in points) \
            and probe <= rule.max_rate_per_s:
        return probe  # once: right after the ramp
    num_fill = sum(min(rates) < r < max(rates) for r in rates[len(ramp):])
    if num_fill >= rule.max_fill_points:
        return None
    lo, hi = target_bracket(points, rule)
    if lo is None or hi is None or hi / lo <= rule.fill_ratio:
        return None
    rate = math.sqrt(lo * hi)
    return None if any(math.isclose(rate, r, rel_tol=1e-6) for r in rates) else rate


def _ramp(points: Sequence[PointResult], rule: SweepRule) -> list[PointResult]:
    """The ramp: the first points (at most max_ramp_points), each growth_factor above the one before, run while the
    one before kept ramping."""
    ramp = [points[0]]
    for p in points[1:rule.max_ramp_points]:
        if math.isclose(p.offered_per_s, ramp[-1].offered_per_s * rule.growth_factor, rel_tol=1e-6) \
                and keeps_ramping(ramp[-1], ramp[0], rule):
            ramp.append(p)
        else:
            break
    return ramp


def target_bracket(points: Sequence[PointResult], rule: SweepRule) -> tuple[float | None, float | None]:
    """(the highest rate that held the target, the lowest rate above it that did not); None where there is none."""
    lo = highest_rate_meeting(points, rule)
    above = [p.offered_per_s for p in points if not meets_target(p, rule) and (lo is None or p.offered_per_s > lo)]
    return lo, (min(above) if above else None)


def highest_rate_meeting(points: Sequence[PointResult], rule: SweepRule) -> float | None:
    """The highest offered rate that held the target; None when none did."""
    good = [p.offered_per_s for p in points if meets_target(p, rule)]
    return max(good) if good else None


def point_at(points: Sequence[PointResult], rate_per_s: float | None) -> PointResult | None:
    return next((p for p in points if rate_per_s is not None and math.isclose(p.offered_per_s, rate_per_s)), None)


def capacity(points: Sequence[PointResult]) -> PointResult | None:
    """The point of the best achieved throughput (the sweep's capacity); None for an empty sweep."""
    return max(points, key=lambda p: p.achieved_per_s, default=None)


def overload_figures(point: PointResult, capacity_point: PointResult) -> dict:
    """An overload point (offered at a multiple of capacity) against the capacity: what share of capacity it still
    delivered, how much was refused early (RESOURCE_EXHAUSTED, and the p99 time to that refusal), and how much ended
    past its deadline or with another error."""
    codes = point.errors_by_code
    return {"offered_per_s": point.offered_per_s, "capacity_per_s": capacity_point.achieved_per_s,
            "achieved_per_s": point.achieved_per_s,
            "fraction_of_capacity": point.achieved_per_s / capacity_point.achieved_per_s
            if capacity_point.achieved_per_s else None,
            "num_sent": point.num_sent, "num_ok": point.num_ok, "num_refused": codes.get(REFUSED, 0),
            "refusal_p99_ms": point.refusal_p99_ms, "num_deadline_exceeded": codes.get(DEADLINE, 0),
            "num_other_errors": sum(v for k, v in codes.items() if k not in (REFUSED, DEADLINE)),
            "ok_p99_ms": point.p99_ms}
