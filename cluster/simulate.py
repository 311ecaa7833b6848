"""A discrete-event simulator of a device's executors under memory tiers, driving the serving policies. Pure.

It replays a workload (requests - one component's chain of expert calls, or a board of components - arriving at given
times or sent by closed-loop stations) through one machine's executors, each a pooled host replica with its own device
and host-memory budgets, using the code the pooled hosts run: `router.assign.rank_replicas` picks the executor of a
request, `experts.arrange.next_batch` what an executor runs next, `experts.tiering.make_room` (and
`experts.eviction` through it) what leaves its pool to make room, `experts.tiering.warm_plan` what it starts with,
`experts.prefetch` what it loads ahead. Ray Serve's multiplexing (LRU of K models by count, `@serve.batch` windows)
is a policy too, so the baselines are simulated beside ExpertMesh. Costs are given per expert (the
profile's K*n+B, bytes, load times or the tiers' bandwidths), so the policies can be compared at scales this machine
cannot run, or fed this machine's profile and a workload to predict a measured run:

    results = simulate_policies(experts, requests, config)   # {policy name: SimResult}

The model (`simulate_model`), the memory tiers (`simulate_tiers`) and the event loop (`simulate_engine`) are beside
this module; `simulate_profile.experts_from_profile` makes the experts from a measured profile. No Ray, no clock but the simulated one; the same inputs give the same results.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence

from expertmesh.cluster.simulate_engine import TaskOutcome, run_task
from expertmesh.cluster.simulate_model import (ABLATION, BASELINE, POLICIES, AssignPolicy, PolicySpec, ServeDeployment,
                                               SimConfig, SimExpert, SimRequest, SimResult)
from expertmesh.cluster.simulate_tiers import Tier
from expertmesh.errors import InvalidArgument

__all__ = ["ABLATION", "BASELINE", "POLICIES", "AssignPolicy", "PolicySpec", "ServeDeployment", "SimConfig", "SimExpert",
           "SimRequest", "SimResult", "simulate", "simulate_policies", "check_inputs"]


def check_inputs(experts: Mapping[str, SimExpert], requests: Sequence[SimRequest], config: SimConfig,
                 policies: Mapping[str, PolicySpec]) -> None:
    """Raise InvalidArgument naming the field and the fix when the inputs cannot be simulated."""
    if not requests:
        raise InvalidArgument("no requests to simulate", field="requests", fix="give at least one request")
    unknown = sorted({e for r in requests for e in r.experts} - set(experts))
    if unknown or any(not c for r in requests for c in r.chains):
        raise InvalidArgument(f"requests call experts with no costs: {unknown[:5] or 'an empty chain'}",
                              field="requests", fix="give a SimExpert for every expert a chain calls, and no "
                                                    "empty chain")
    bad = sorted(e for e, x in experts.items() if x.num_bytes <= 0 or x.max_batch < 1 or x.k_ms_per_item < 0
                 or x.b_ms < 0)
    if bad:
        raise InvalidArgument(f"experts {bad[:5]} have a non-positive size or batch, or a negative cost",
                              field="experts", fix="give num_bytes > 0, max_batch >= 1, k_ms_per_item and b_ms >= 0")
    for name, spec in policies.items():
        if spec.serve_multiplexed:
            served = [e for d in spec.serve_multiplexed for e in d.experts]
            missing = sorted({e for r in requests for e in r.experts} - set(served))
            twice = sorted({e for e in served if served.count(e) > 1})
            if missing or twice:
                raise InvalidArgument(f"policy {name}: every called expert must be in exactly one deployment "
                                      f"(missing {missing[:5]}, twice {twice[:5]})", field="serve_multiplexed",
                                      fix="give each expert to one ServeDeployment")
            continue
        n = config.num_executors(spec)
        budget = config.pool_budget_bytes(n)
        too_big = sorted(e for e, x in experts.items() if x.num_bytes > budget)
        if too_big:
            raise InvalidArgument(f"policy {name}: experts {too_big[:5]} are larger than an executor's pool of "
                                  f"{budget} bytes ({n} executor(s) on {config.device_budget_bytes} bytes, "
                                  f"{config.activation_reserve_bytes} reserved each)", field="device_budget_bytes",
                                  fix="raise the device budget, or lower num_parallel_executors or the reserve")


def _merge(outcomes: Sequence[TaskOutcome], num_executors: int, pool_budget_bytes: int) -> SimResult:
    latencies = sorted(ms for o in outcomes for ms in o.latencies_ms)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0
    evictions: Counter = sum((o.tiers.evictions for o in outcomes), Counter())
    return SimResult(
        num_requests=len(latencies), makespan_ms=sum(o.makespan_ms for o in outcomes),
        switches=sum(sum(o.tiers.loads.values()) for o in outcomes),
        loads_from_host=sum(o.tiers.loads[Tier.HOST] for o in outcomes),
        loads_from_disk=sum(o.tiers.loads[Tier.DISK] for o in outcomes),
        demotions_to_host=sum(o.tiers.demotions_to_host for o in outcomes),
        dropped_to_disk=sum(o.tiers.dropped_to_disk for o in outcomes), evictions=dict(sorted(evictions.items())),
        num_batches=sum(o.num_batches for o in outcomes), num_calls=sum(o.num_calls for o in outcomes),
        p50_ms=pct(0.5), p99_ms=pct(0.99),
        peak_device_bytes=max(o.tiers.peak_device_bytes for o in outcomes),
        peak_pool_bytes=tuple(max(p) for p in zip(*(o.tiers.peak_pool_bytes for o in outcomes))),
        peak_host_bytes=max(o.tiers.peak_host_bytes for o in outcomes), num_executors=num_executors,
        pool_budget_bytes=pool_budget_bytes,
        task_throughput_per_s=tuple(len(o.latencies_ms) / (o.makespan_ms / 1000.0) if o.makespan_ms > 0 else 0.0
                                    for o in outcomes),
        prefetch_loads=sum(sum(o.tiers.prefetches.values()) for o in outcomes),
        num_components=sum(o.num_components for o in outcomes))


def simulate(experts: Mapping[str, SimExpert], requests: Sequence[SimRequest], config: SimConfig,
             policy: PolicySpec) -> SimResult:
    """Every request to the end of its chain under one policy; tasks run one after another from the same start."""
    check_inputs(experts, requests, config, {policy.label: policy})
    by_task: dict[int, list[SimRequest]] = defaultdict(list)
    for r in requests:
        by_task[r.task].append(r)
    outcomes = [run_task(experts, by_task[t], config, policy) for t in sorted(by_task)]
    n = config.num_executors(policy)
    return _merge(outcomes, n, outcomes[0].tiers.pools[0].device_budget_bytes if outcomes else 0)


def simulate_policies(experts: Mapping[str, SimExpert], requests: Sequence[SimRequest], config: SimConfig,
                      policies: Mapping[str, PolicySpec] | None = None,
                      progress: Callable[[str, SimResult], None] | None = None) -> dict[str, SimResult]:
    """The same workload under each policy (default: every one in POLICIES); `progress` hears of each as it ends."""
    policies = dict(POLICIES if policies is None else policies)
    check_inputs(experts, requests, config, policies)
    out = {}
    for name, spec in policies.items():
        out[name] = simulate(experts, requests, config, spec)
        if progress:
            progress(name, out[name])
    return out
