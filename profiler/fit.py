"""The latency model of an expert and its largest useful batch: pure functions of measured timings.

latency_ms(n) = K * n + B, fitted by least squares over the measured batch sizes (each point the
median of repeated runs), with R^2 reported. The largest useful batch is where per-item time stops
improving (within `min_gain` of the best per-item time), among the batches that fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field


class LatencyFit(BaseModel):
    k_ms_per_item: float = Field(description="marginal cost of one more image in a batch")
    b_ms: float = Field(description="fixed cost of a batch")
    r2: float = Field(description="coefficient of determination of the fit (1 = perfect)")
    num_points: int

    def predict_ms(self, batch_size: int) -> float:
        return self.k_ms_per_item * batch_size + self.b_ms


def fit_linear(batch_sizes: Sequence[int], latencies_ms: Sequence[float]) -> LatencyFit:
    """Least-squares line through (batch size, latency); needs at least two distinct batch sizes."""
    n = np.asarray(batch_sizes, dtype=float)
    y = np.asarray(latencies_ms, dtype=float)
    if len(n) != len(y) or len(set(n.tolist())) < 2:
        raise ValueError(f"need latencies for at least two distinct batch sizes, got sizes {list(batch_sizes)}; "
                         "fix: measure more batch sizes (max batch >= 2)")
    a = np.stack([n, np.ones_like(n)], axis=1)
    (k, b), *_ = np.linalg.lstsq(a, y, rcond=None)
    residual = float(np.sum((y - (k * n + b)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return LatencyFit(k_ms_per_item=float(k), b_ms=float(b), r2=float(r2), num_points=len(n))


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
