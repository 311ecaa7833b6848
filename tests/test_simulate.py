"""The executor simulator (cluster/simulate.py, pure) drives the arrange and eviction policies."""

from __future__ import annotations

import random

import pytest

from expertmesh.cluster.simulate import SimExpert, SimRequest, simulate
from expertmesh.experts.arrange import ArrangePolicy
from expertmesh.experts.eviction import EvictionPolicy


def workload(num_experts: int = 12, num_requests: int = 400, seed: int = 3):
    """A classifier-like head expert per request, then one of `num_experts` (Zipf-skewed), some with a detector."""
    rng = random.Random(seed)
    experts = {"cls": SimExpert(10, 0.2, 1.0, load_ms=20.0, usage=1.0), "det": SimExpert(10, 0.3, 1.0, 20.0, usage=0.3)}
    weights = [1.0 / (k + 1) for k in range(num_experts)]
    for k in range(num_experts):
        experts[f"e{k}"] = SimExpert(10, 0.3, 2.0, load_ms=20.0, usage=weights[k] / sum(weights))
    reqs = []
    for i in range(num_requests):
        e = rng.choices([f"e{k}" for k in range(num_experts)], weights)[0]
        reqs.append(SimRequest(i * 0.5, ("cls", e, "det") if rng.random() < 0.3 else ("cls", e)))
    upstreams = {f"e{k}": {"cls"} for k in range(num_experts)} | {"det": {f"e{k}" for k in range(num_experts)}}
    return experts, reqs, upstreams


def test_every_request_finishes_and_arranging_cuts_switches_under_a_tight_budget():
    experts, reqs, upstreams = workload()
    budget = 40  # four of fourteen experts fit
    fcfs = simulate(experts, reqs, budget, arrange=ArrangePolicy.FCFS, evict=EvictionPolicy.LRU, upstreams=upstreams)
    coserve = simulate(experts, reqs, budget, arrange=ArrangePolicy.COSERVE, evict=EvictionPolicy.COSERVE,
                       upstreams=upstreams)
    assert fcfs.num_requests == coserve.num_requests == len(reqs)
    assert coserve.switches <= 0.5 * fcfs.switches, (coserve, fcfs)
    assert coserve.throughput_per_s > fcfs.throughput_per_s


def test_with_room_for_everything_each_expert_loads_once():
    experts, reqs, upstreams = workload()
    result = simulate(experts, reqs, 10 * len(experts), arrange=ArrangePolicy.COSERVE, evict=EvictionPolicy.COSERVE,
                      upstreams=upstreams)
    assert result.switches == len({e for r in reqs for e in r.chain})


def test_an_expert_larger_than_the_budget_is_refused():
    experts, reqs, upstreams = workload()
    with pytest.raises(ValueError, match="larger than the budget"):
        simulate(experts, reqs, 5, arrange=ArrangePolicy.FCFS, evict=EvictionPolicy.LRU, upstreams=upstreams)
