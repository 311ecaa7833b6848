"""The latency model of an expert and its largest useful batch: pure functions of measured timings.

latency_ms(n) = K * n + B, fitted over the measured batch sizes (each point the median of repeated runs) by
**bounded, relatively weighted least squares**: K >= `MIN_K_MS` (a batch of one more image never costs nothing)
and B >= 0 (a batch never takes negative time), each point's residual divided by its own latency. Why this fit:
- plain least squares gave a negative intercept on this 2-core machine in 3 of 5 profile runs (B = -0.26 ms for
  soic_defect): the large batches' absolute noise (milliseconds) outweighs the small ones whose latency *is* B, so
  one slow large-batch median tilts the line below the origin. Bounds make every fit a valid cost model
  (`scipy.optimize.lsq_linear`, an exact convex solve, no iteration to tune);
- relative weights make a 5% error at batch 1 cost as much as a 5% error at batch 32, so B is fitted where it is
  seen (the small batches) rather than extrapolated from the large ones;
- the points are medians of repeated runs already, so a robust loss adds nothing the median does not give.
R^2 is reported unweighted. The largest useful batch is where per-item time stops improving (within `min_gain` of
the best per-item time), among the batches that fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field
from scipy.optimize import lsq_linear

MIN_K_MS = 1e-6  # the least marginal cost per image a fit may report (K > 0)


class LatencyFit(BaseModel):
    k_ms_per_item: float = Field(description="marginal cost of one more image in a batch (> 0)")
    b_ms: float = Field(description="fixed cost of a batch (>= 0)")
    r2: float = Field(description="coefficient of determination of the fit (1 = perfect)")
    num_points: int

    def predict_ms(self, batch_size: int) -> float:
        return self.k_ms_per_item * batch_size + self.b_ms

    def problems(self) -> list[str]:
        """Why this fit is not a usable cost model (empty: it is): K must be > 0, B >= 0, both finite."""
        out = []
        if not (np.isfinite(self.k_ms_per_item) and self.k_ms_per_item > 0):
            out.append(f"fit K = {self.k_ms_per_item:g} ms per image is not positive")
        if not (np.isfinite(self.b_ms) and self.b_ms >= 0):
            out.append(f"fit B = {self.b_ms:g} ms per batch is negative")
        return out


def fit_linear(batch_sizes: Sequence[int], latencies_ms: Sequence[float]) -> LatencyFit:
    """K*n + B through (batch size, latency) with K >= MIN_K_MS and B >= 0, residuals relative to each latency;
    needs at least two distinct batch sizes and positive, finite latencies."""
    n = np.asarray(batch_sizes, dtype=float)
    y = np.asarray(latencies_ms, dtype=float)
    if len(n) != len(y) or len(set(n.tolist())) < 2:
        raise ValueError(f"need latencies for at least two distinct batch sizes, got sizes {list(batch_sizes)}; "
                         "fix: measure more batch sizes (max batch >= 2)")
    if not (np.all(np.isfinite(y)) and np.all(y > 0)):
        raise ValueError(f"latencies must be positive and finite, got {list(latencies_ms)}; "
                         "fix: re-run the measurement (`expertmesh profile --force`)")
    w = 1.0 / y
    a = np.stack([n * w, w], axis=1)
    (k, b) = lsq_linear(a, y * w, bounds=([MIN_K_MS, 0.0], [np.inf, np.inf]), method="bvls").x
    k, b = max(float(k), MIN_K_MS), max(float(b), 0.0)
    residual = float(np.sum((y - (k * n + b)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return LatencyFit(k_ms_per_item=k, b_ms=b, r2=float(r2), num_points=len(n))


def largest_useful_batch(batch_sizes: Sequence[int], latencies_ms: Sequence[float], *, min_gain: float = 0.05,
                         peak_bytes: Sequence[int] | None = None, memory_limit_bytes: int | None = None) -> int:
    """Where per-item time stops improving: the smallest batch whose per-item time is within `min_gain` of the best
    per-item time of any batch that fits in memory. Larger batches only add latency; comparing with the best (not
    with the neighbour) keeps one noisy small-batch point from ending the walk early."""
    fits = [i for i in range(len(batch_sizes))
            if memory_limit_bytes is None or peak_bytes is None or peak_bytes[i] <= memory_limit_bytes]
    if not fits:
        return int(min(batch_sizes))
    per_item = {i: latencies_ms[i] / batch_sizes[i] for i in fits}
    best = min(per_item.values())
    return int(min(batch_sizes[i] for i in fits if per_item[i] <= best * (1.0 + min_gain)))


def batch_sizes_up_to(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (max_batch itself included)."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    sizes.append(max_batch)
    return sizes
