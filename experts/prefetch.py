"""Which downstream experts to bring onto the device while their upstream runs (CoServe's prefetch). Pure.

When an upstream expert's batch runs, its outputs may trigger downstream experts (the spec's dependency edges, with
their expected trigger probability). Loading a likely downstream expert before its calls arrive turns their switch
into a hit. `prefetch` names the downstream experts worth it: not on the device already, triggered with at least
`min_probability` per call (so at least once in the batch with probability 1 - (1 - p)^n), and fitting in the
device's free memory as it is - a prefetch never evicts anything. Most likely first.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping


def prefetch(downstream: Mapping[str, float], num_calls: int, *, on_device: Collection[str],
             num_bytes: Mapping[str, int], free_device_bytes: int | None, min_probability: float = 0.5) -> list[str]:
    """Downstream experts to load now, most likely first. `downstream`: expert -> P(triggered | one upstream call)."""
    chance = {d: 1.0 - (1.0 - min(max(p, 0.0), 1.0)) ** max(num_calls, 1) for d, p in downstream.items()}
    out: list[str] = []
    free = free_device_bytes
    for d in sorted(chance, key=lambda d: (-chance[d], d)):
        if d in on_device or chance[d] < min_probability:
            continue
        if free is not None:
            if num_bytes.get(d, 0) > free:
                continue
            free -= num_bytes.get(d, 0)
        out.append(d)
    return out
