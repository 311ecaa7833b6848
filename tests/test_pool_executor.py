"""The pooled host's executor on real tiny experts, without Ray: budgets hold, answers do not depend on the policy,
and grouping calls by expert switches less than first-come-first-served."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from expertmesh.deployments.pool_executor import PoolExecutor, PoolSettings
from expertmesh.errors import ResourceExhausted
from expertmesh.experts.runtime import ExpertRuntime
from expertmesh.experts.spec import resolve_checkpoint


class RecordedMetrics:
    """Collects what the executor reports (the Ray metrics themselves are tested with a real Prometheus)."""

    def __init__(self) -> None:
        self.counts: dict[tuple, float] = {}

    def inc(self, name, value=1.0, **tags):
        key = (name, tuple(sorted(tags.items())))
        self.counts[key] = self.counts.get(key, 0.0) + value

    def set(self, name, value, **tags):
        pass

    def observe(self, name, value, **tags):
        pass


def make_pool(spec, zoo, **settings) -> PoolExecutor:
    runtimes = {e.name: ExpertRuntime(e, resolve_checkpoint(e, zoo), device="cpu") for e in spec.experts}
    pool = PoolExecutor(spec, runtimes, ThreadPoolExecutor(max_workers=1), threading.Lock(), RecordedMetrics(), "n0",
                        on_moves=lambda *_: None)
    pool.configure(PoolSettings(**settings), {})
    return pool


def workload(spec, num_calls: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Calls spread over every classifying expert, in a shuffled order (each a single image)."""
    rng = np.random.default_rng(seed)
    experts = [e for e in spec.experts if e.task == "classify"]
    out = []
    for _ in range(num_calls):
        e = experts[int(rng.integers(len(experts)))]
        s = e.input_size_px
        out.append((e.name, rng.integers(0, 255, (1, s, s, 3), dtype=np.uint8)))
    return out


def run_all(pool: PoolExecutor, calls) -> list[str]:
    async def go():
        results = await asyncio.gather(*(pool.submit(e, x) for e, x in calls))
        return [f"{e}:{r[0][0].label}:{r[0][0].score:.5f}" for (e, _), r in zip(calls, results)]
    return asyncio.run(go())


@pytest.fixture(scope="module")
def calls(tiny_spec):
    return workload(tiny_spec, 120)


def test_answers_do_not_depend_on_the_budget_or_the_policy_and_budgets_hold(tiny_spec, tiny_zoo, calls):
    unlimited = make_pool(tiny_spec, tiny_zoo)
    expected = run_all(unlimited, calls)
    assert unlimited.stats()["evictions_by_reason"] == {}
    one_third = sum(rt.footprint_bytes for rt in unlimited.runtimes.values()) // 3
    for arrange, evict in (("coserve", "coserve"), ("fcfs", "lru"), ("fcfs", "fifo")):
        pool = make_pool(tiny_spec, tiny_zoo, device_budget_bytes=one_third, host_budget_bytes=one_third,
                         arrange=arrange, evict=evict)
        assert run_all(pool, calls) == expected, (arrange, evict)
        stats = pool.stats()
        assert stats["peak_device_bytes"] <= one_third and stats["peak_host_bytes"] <= one_third
        assert stats["switches"] > 0 and sum(stats["evictions_by_reason"].values()) > 0
        assert stats["calls"] == len(calls)
        assert sum(stats["loads_by_tier"].values()) == stats["switches"] + stats["prefetch_loads"]


def test_grouping_by_expert_switches_far_less_than_fcfs_with_lru(tiny_spec, tiny_zoo, calls):
    budget = sum(ExpertRuntime(e, resolve_checkpoint(e, tiny_zoo)).footprint_bytes for e in tiny_spec.experts) // 3
    coserve = make_pool(tiny_spec, tiny_zoo, device_budget_bytes=budget)
    fcfs = make_pool(tiny_spec, tiny_zoo, device_budget_bytes=budget, arrange="fcfs", evict="lru", prefetch=False)
    run_all(coserve, calls)
    run_all(fcfs, calls)
    assert coserve.stats()["switches"] * 3 <= fcfs.stats()["switches"], (coserve.stats(), fcfs.stats())


def test_warm_fills_the_device_then_host_memory_most_used_first(tiny_spec, tiny_zoo):
    pool = make_pool(tiny_spec, tiny_zoo)
    size = pool.runtimes["chip_defect"].footprint_bytes
    pool.configure(PoolSettings(device_budget_bytes=2 * size + 1000, host_budget_bytes=3 * size + 1000,
                                usage={"qfp_defect": 0.5, "diode_defect": 0.4, "connector_defect": 0.3}), {})
    placed = pool.warm(["chip_defect", "qfp_defect", "diode_defect", "connector_defect", "sot23_defect"])
    assert placed == ["qfp_defect", "diode_defect"]
    in_host = sorted(e for e, rt in pool.runtimes.items() if rt.in_host)
    # host copies go first to the experts left off the device (each turns a disk read into a copy), most used first
    assert in_host == ["chip_defect", "connector_defect", "sot23_defect"]
    assert pool.stats()["peak_device_bytes"] <= 2 * size + 1000
    assert pool.stats()["peak_host_bytes"] <= 3 * size + 1000


def test_warm_follows_the_tiers_the_plan_predicted_with(tiny_spec, tiny_zoo):
    """The plan ranks by the calls it planned (cluster.memory_model); the host warms in that order, within budgets."""
    from expertmesh.experts.tiering import WarmPlan

    pool = make_pool(tiny_spec, tiny_zoo)
    size = pool.runtimes["chip_defect"].footprint_bytes
    pool.configure(PoolSettings(device_budget_bytes=2 * size + 1000, host_budget_bytes=size + 1000,
                                usage={"qfp_defect": 0.5, "diode_defect": 0.4}), {})
    planned = WarmPlan(("sot23_defect", "chip_defect"), ("connector_defect",))
    placed = pool.warm(["chip_defect", "qfp_defect", "diode_defect", "connector_defect", "sot23_defect"], planned)
    assert placed == ["sot23_defect", "chip_defect"]
    assert sorted(e for e, rt in pool.runtimes.items() if rt.in_host) == ["connector_defect"]


def test_an_expert_larger_than_the_device_budget_fails_its_calls_clearly(tiny_spec, tiny_zoo):
    pool = make_pool(tiny_spec, tiny_zoo, device_budget_bytes=1000)
    x = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ResourceExhausted, match="does not fit the pool's device budget of 1000 bytes"):
        asyncio.run(pool.submit("chip_defect", x))


def test_settings_name_the_bad_value():
    with pytest.raises(ValueError, match="device_budget_bytes"):
        PoolSettings(device_budget_bytes=0)
    with pytest.raises(ValueError, match="arrange"):
        PoolSettings(arrange="random")
