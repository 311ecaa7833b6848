"""The strongest Ray Serve multiplexing configuration for a memory budget: the candidates a skilled user would try.

Serve's multiplexer counts models, not bytes, and the workload's experts differ in size by two orders of magnitude
(tiny component experts, ResNet-18-class detectors), so a skilled user splits them by size class - one multiplexed
deployment per class, each with the K that fills its share of the device budget with models of its size and its own
batch size - or keeps one deployment with K by the largest expert or by usage. `candidates` lists every such
configuration for the budgets (each with the fast loader and the load function's host cache: bench/multiplexed_app.py);
the benchmark measures each on a short closed-loop run and keeps the best (`bench/memory_run.py`). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from expertmesh.bench.memory_systems import MuxConfig, MuxDeployment, models_per_replica

SIZE_GAP = 4.0  # experts more than this many times larger than the next smaller one start a new size class


def size_classes(expert_bytes: Mapping[str, int]) -> list[tuple[str, ...]]:
    """The experts by size class, smallest class first: a new class where the next expert is SIZE_GAP x larger."""
    ranked = sorted(expert_bytes, key=lambda e: (expert_bytes[e], e))
    classes: list[list[str]] = []
    for e in ranked:
        if classes and expert_bytes[e] <= SIZE_GAP * expert_bytes[classes[-1][-1]]:
            classes[-1].append(e)
        else:
            classes.append([e])
    return [tuple(c) for c in classes]


def _batch(experts: Sequence[str], max_batch: Mapping[str, int]) -> int:
    return max(max_batch[e] for e in experts)


def candidates(expert_bytes: Mapping[str, int], usage: Mapping[str, float], max_batch: Mapping[str, int],
               device_bytes: int, host_bytes: int | None) -> list[MuxConfig]:
    """Every configuration to try, at most `device_bytes` of weights held at once (K models of a class's largest
    size per deployment) and `host_bytes` of host copies in all: one deployment (K by the largest expert, K by usage),
    and with two or more size classes one deployment per class for every K of the largest class that leaves the
    smaller classes room for one model each; the smaller classes get the rest of the device budget, the largest as
    much host memory as the smaller classes' experts off the device leave."""
    out: list[MuxConfig] = []
    every = tuple(sorted(expert_bytes))
    for rule in ("largest", "usage"):
        k = models_per_replica(device_bytes, expert_bytes, rule, usage)
        out.append(MuxConfig(f"one deployment, K = {k} ({rule})",
                             (MuxDeployment(every, k, host_bytes, _batch(every, max_batch), device_bytes),)))
    classes = size_classes(expert_bytes)
    if len(classes) < 2:
        return out
    *small, large = classes
    large_max = max(expert_bytes[e] for e in large)
    small_max = [max(expert_bytes[e] for e in c) for c in small]
    for k_large in range(1, min(len(large), device_bytes // large_max) + 1):
        left = device_bytes - k_large * large_max
        if left < sum(small_max):
            break
        deps, host_left = [], host_bytes
        for c, biggest in zip(small, small_max):  # the smaller classes share what is left by their bytes
            share = left * sum(expert_bytes[e] for e in c) // max(1, sum(expert_bytes[e] for s in small for e in s))
            k = max(1, min(len(c), share // biggest))
            off = sum(sorted((expert_bytes[e] for e in c), reverse=True)[k:])
            cache = None if host_bytes is None else min(off, host_left)
            host_left = None if host_left is None else host_left - (cache or 0)
            deps.append(MuxDeployment(c, k, cache, _batch(c, max_batch), k * biggest))
        deps.append(MuxDeployment(large, k_large, host_left, _batch(large, max_batch), k_large * large_max))
        out.append(MuxConfig(f"{len(deps)} deployments by size class, K = "
                             + " / ".join(str(x.max_models) for x in deps), tuple(deps)))
    return out
