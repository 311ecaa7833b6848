"""The latency model of an expert and its largest useful batch: pure functions of measured timings.

latency_ms(n) = K * n + B, fitted by least squares over the measured batch sizes (each point the
median of repeated runs), with R^2 reported. The largest useful batch is where per-item time stops
improving by at least `min_gain` from one batch size to the next, or where memory runs out.
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
    """Walk up the (ascending) batch sizes; stop before the first size whose per-item time is not at least
    `min_gain` better than the last useful one, or whose peak memory exceeds the limit."""
    order = sorted(range(len(batch_sizes)), key=lambda i: batch_sizes[i])
    best = order[0]
    for i in order[1:]:
        if memory_limit_bytes is not None and peak_bytes is not None and peak_bytes[i] > memory_limit_bytes:
            break
        per_item, best_per_item = latencies_ms[i] / batch_sizes[i], latencies_ms[best] / batch_sizes[best]
        if per_item >= best_per_item * (1.0 - min_gain):
            break
        best = i
    return int(batch_sizes[best])


def batch_sizes_up_to(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (max_batch itself included)."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    sizes.append(max_batch)
    return sizes
