"""What an expert host runs next: a wave's calls for one expert, split into batches. Pure.

A host takes a wave of calls grouped by expert (`router.waves.take_calls`); each expert's group runs
as batches no larger than its best batch (the profile's largest useful batch, else the spec's
max_batch), split evenly so no batch is a small remainder. The memory-limited serving work extends
this module (order across experts, batches bounded by free memory).
"""

from __future__ import annotations


def split_batches(num_items: int, max_batch: int) -> list[slice]:
    """`num_items` calls -> consecutive slices of at most `max_batch`, as even as possible (70 by 64: 35 + 35)."""
    if max_batch < 1:
        raise ValueError(f"max_batch is {max_batch}; it must be at least 1")
    if num_items <= 0:
        return []
    num_batches = -(-num_items // max_batch)
    base, extra = divmod(num_items, num_batches)
    out, start = [], 0
    for b in range(num_batches):
        size = base + (1 if b < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out
