"""The simulator (cluster/simulate*.py, pure): memory tiers, executors with assign, arrange and eviction policies."""

from __future__ import annotations

import random

import pytest

from expertmesh.cluster.simulate import (POLICIES, AssignPolicy, PolicySpec, ServeDeployment, SimConfig, SimExpert,
                                         SimRequest, simulate, simulate_policies)
from expertmesh.cluster.simulate_profile import experts_from_profile
from expertmesh.cluster.simulate_tiers import SimPool, Tier, Tiers
from expertmesh.errors import InvalidArgument
from expertmesh.experts.arrange import ArrangePolicy
from expertmesh.experts.eviction import EvictionPolicy
from expertmesh.profiler.fit import LatencyFit
from expertmesh.profiler.store import BatchTiming, EdgeWeight, ExpertProfile, MoveTiming, ProfileStore, UsageProfile

MB = 10**6


def config(device_mb: int = 45, host_mb: int = 30, **over) -> SimConfig:
    """1 MB/ms from host, 0.1 MB/ms from disk: a 10 MB expert loads in 10 ms from host, 100 ms from disk."""
    return SimConfig(**({"device_budget_bytes": device_mb * MB, "host_budget_bytes": host_mb * MB,
                         "host_to_device_bytes_per_s": 1e9, "disk_bytes_per_s": 1e8, "max_wait_ms": 500.0,
                         "warm_start": False} | over))


def workload(num_experts: int = 14, num_requests: int = 600, seed: int = 3, num_tasks: int = 2):
    """A Zipf mix over `num_experts` 10 MB experts; a third of the calls of half of them trigger a shared detector."""
    rng = random.Random(seed)
    names = [f"e{k}" for k in range(num_experts)]
    weights = [1.0 / (k + 1) for k in range(num_experts)]
    usage = {n: w / sum(weights) for n, w in zip(names, weights)}
    with_detector = set(names[::2])
    experts = {n: SimExpert(10 * MB, 1.0, 4.0, max_batch=16, usage=usage[n]) for n in names}
    experts["det"] = SimExpert(10 * MB, 2.0, 4.0, max_batch=8, usage=sum(usage[n] for n in with_detector) / 3,
                               upstreams=frozenset(with_detector))
    reqs = []
    for t in range(num_tasks):
        for i, e in enumerate(rng.choices(names, weights, k=num_requests // num_tasks)):
            chain = (e, "det") if e in with_detector and rng.random() < 1 / 3 else (e,)
            reqs.append(SimRequest(i * 2.0, chain, task=t))
    return experts, reqs


def test_every_request_finishes_and_no_tier_ever_exceeds_its_budget():
    experts, reqs = workload()
    cfg = config(activation_reserve_bytes=2 * MB)
    for name, result in simulate_policies(experts, reqs, cfg).items():
        assert result.num_requests == len(reqs), name
        assert result.num_calls == sum(len(r.chain) for r in reqs), name
        assert all(peak <= result.pool_budget_bytes for peak in result.peak_pool_bytes), (name, result)
        assert result.peak_device_bytes <= cfg.device_budget_bytes, name
        assert result.peak_host_bytes <= cfg.host_budget_bytes, name
        assert result.switches == result.loads_from_host + result.loads_from_disk, name
        assert result.demotions_to_host <= sum(result.evictions.values()) <= result.switches, name


def test_with_room_for_everything_each_expert_loads_once_from_disk():
    experts, reqs = workload()
    result = simulate(experts, reqs[:300], config(device_mb=1000), POLICIES["fcfs_lru"])
    assert result.switches == result.loads_from_disk == len({e for r in reqs[:300] for e in r.chain})
    assert result.evictions == {} and result.loads_from_host == 0


def test_an_evicted_expert_comes_back_from_host_memory_and_costs_the_host_load():
    experts = {"a": SimExpert(10 * MB, 1.0, 0.0), "b": SimExpert(10 * MB, 1.0, 0.0)}
    reqs = [SimRequest(0.0, ("a",)), SimRequest(1000.0, ("b",)), SimRequest(2000.0, ("a",))]
    result = simulate(experts, reqs, config(device_mb=10, host_mb=20), POLICIES["fcfs_lru"])
    assert (result.loads_from_disk, result.loads_from_host, result.demotions_to_host) == (2, 1, 2)
    # a from disk (100 ms) + 1 ms; b at 1000 from disk (100) + 1; a at 2000 from host (10) + 1
    assert result.makespan_ms == pytest.approx(2011.0)
    without_host = simulate(experts, reqs, config(device_mb=10, host_mb=0), POLICIES["fcfs_lru"])
    assert (without_host.loads_from_disk, without_host.loads_from_host) == (3, 0)
    assert without_host.makespan_ms == pytest.approx(2101.0)


def test_measured_load_times_override_the_bandwidths():
    experts = {"a": SimExpert(10 * MB, 0.0, 0.0, load_from_disk_ms=7.0)}
    result = simulate(experts, [SimRequest(0.0, ("a",))], config(), POLICIES["fcfs_lru"])
    assert result.makespan_ms == pytest.approx(7.0)


def test_a_pool_makes_room_with_the_pooled_hosts_own_code_and_keeps_host_copies_inclusive():
    """The simulator's pool is a host replica's: `experts.tiering.make_room` decides (queued experts protected under
    every policy), a device expert keeps its host copy (evicting it is free, coming back is a copy), and a copy read
    from disk stays in host memory while the host budget holds it."""
    sizes = {"a": 10, "b": 10, "c": 10, "x": 81}
    tiers = Tiers([SimPool(20, 30)], sizes, usage={"a": 0.5, "b": 0.1, "c": 0.3})
    for e, t in (("a", 1.0), ("b", 2.0)):
        tiers.load(0, e, tiers.room(0, EvictionPolicy.LRU, e, busy=(), running={e}, upstreams={}), t)
    assert set(tiers.pools[0].device) == set(tiers.pools[0].host) == {"a", "b"}
    plan = tiers.room(0, EvictionPolicy.LRU, "c", busy={"a"}, running={"c"}, upstreams={})
    assert [ev.expert for ev in plan.evictions] == ["b"]  # a has queued work: kept, as on the host
    assert tiers.load(0, "c", plan, 3.0) is Tier.DISK
    assert set(tiers.pools[0].device) == {"a", "c"} and "b" in tiers.pools[0].host  # b left the device, kept its copy
    back = tiers.room(0, EvictionPolicy.LRU, "b", busy=(), running={"b"}, upstreams={})
    assert tiers.load(0, "b", back, 4.0) is Tier.HOST  # from its host copy: one copy, not a disk read
    assert tiers.loads == {Tier.DISK: 3, Tier.HOST: 1} and tiers.pools[0].peak_host_bytes <= 30
    assert tiers.room(0, EvictionPolicy.LRU, "x", busy=(), running={"x"}, upstreams={}) is None  # larger than the pool


def test_under_coserve_eviction_host_copies_of_the_least_used_go_first_as_on_the_pooled_host():
    """A device of one expert and host memory for two copies: a, b, c in turn from disk. Keeping c's copy drops one:
    under CoServe the least used (b), under LRU the least recently used (a)."""
    usage = {"a": 0.5, "b": 0.1, "c": 0.3}
    for policy, kept in ((EvictionPolicy.COSERVE, {"a", "c"}), (EvictionPolicy.LRU, {"b", "c"})):
        tiers = Tiers([SimPool(10, 20)], {e: 10 for e in usage}, usage=usage)
        for t, e in enumerate("abc"):
            tiers.load(0, e, tiers.room(0, policy, e, busy=(), running={e}, upstreams={}), float(t))
        assert set(tiers.pools[0].host) == kept, (policy, tiers.pools[0].host)


def test_the_warm_start_is_the_pooled_hosts_warm_plan():
    """Most used on the device while it fits; host copies go first to the experts left off the device."""
    usage = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}
    tiers = Tiers([SimPool(20, 20)], {e: 10 for e in usage}, usage=usage)
    tiers.warm(0, list(usage), 0.0)
    assert set(tiers.pools[0].device) == {"a", "b"} and set(tiers.pools[0].host) == {"c", "d"}
    assert tiers.loads == {}


def test_arrange_and_coserve_eviction_cut_switches_and_win_on_a_skewed_workload():
    experts, reqs = workload()
    out = simulate_policies(experts, reqs, config(), {k: POLICIES[k] for k in ("fcfs_lru", "evict_arrange",
                                                                               "expertmesh")})
    base = out["fcfs_lru"]
    for name in ("evict_arrange", "expertmesh"):
        assert out[name].switches <= 0.5 * base.switches, (name, out[name], base)
        assert out[name].throughput_per_s >= 1.5 * base.throughput_per_s, (name, out[name], base)


def test_assign_sends_a_request_where_its_expert_is_and_round_robin_and_pow2_do_not():
    """Two executors, each with room for one expert; both warm alike (a host deployment's replicas get the same
    config), so the first switch of b decides where it lives: assign keeps sending b there."""
    experts = {"a": SimExpert(10 * MB, 1.0, 1.0, usage=0.6), "b": SimExpert(10 * MB, 1.0, 1.0, usage=0.4)}
    reqs = [SimRequest(10.0 * i, ("a" if i % 3 else "b",)) for i in range(60)]
    cfg = config(device_mb=20, host_mb=0, warm_start=True)
    assigned = simulate(experts, reqs, cfg, POLICIES["expertmesh"])
    dealt = simulate(experts, reqs, cfg, POLICIES["round_robin"])
    pow2 = simulate(experts, reqs, cfg, POLICIES["expertmesh"].model_copy(update={"assign": AssignPolicy.POW2}))
    assert assigned.num_executors == dealt.num_executors == pow2.num_executors == 2
    assert assigned.switches <= 1
    assert dealt.switches > 10 and pow2.switches > 5


def test_compute_slots_run_executors_at_once_and_cpu_loads_take_a_slot():
    """Two executors on one slot take turns (a GPU, or one core); on two slots they run at once. A CPU load
    (`loads_use_compute`) occupies the slot it copies with."""
    experts = {e: SimExpert(10 * MB, 10.0, 0.0, max_batch=1, usage=0.5) for e in ("a", "b")}
    reqs = [SimRequest(0.0, (e,)) for e in "ab" * 10]
    rr = POLICIES["round_robin"]
    one = simulate(experts, reqs, config(device_mb=1000, warm_start=True), rr)
    two = simulate(experts, reqs, config(device_mb=1000, warm_start=True, compute_slots=2), rr)
    assert one.makespan_ms == pytest.approx(200.0) and two.makespan_ms == pytest.approx(100.0)
    cold = {"a": SimExpert(10 * MB, 10.0, 0.0, load_from_disk_ms=50.0)}
    gpu = simulate(cold, [SimRequest(0.0, ("a",))], config(), POLICIES["fcfs_lru"])
    cpu = simulate(cold, [SimRequest(0.0, ("a",))], config(loads_use_compute=True), POLICIES["fcfs_lru"])
    assert gpu.makespan_ms == cpu.makespan_ms == pytest.approx(60.0)


def test_a_board_runs_in_waves_and_is_answered_once():
    """A board of three components: the first wave (every component's first call) runs before any dependent call,
    and the board counts one request of three components."""
    experts = {"a": SimExpert(10 * MB, 1.0, 0.0), "b": SimExpert(10 * MB, 1.0, 0.0), "det": SimExpert(10 * MB, 5.0, 0.0)}
    board = SimRequest.board(0.0, (("a", "det"), ("b",), ("a", "det")), branches=((1, 1, "det"),))
    assert board.num_calls == 6 and board.wave(1) == [(0, "det"), (2, "det"), (1, "det")]
    out = simulate(experts, [board], config(device_mb=1000, warm_start=True), POLICIES["evict_arrange"])
    assert (out.num_requests, out.num_components, out.num_calls) == (1, 3, 6)
    assert out.makespan_ms == pytest.approx(2 * 1.0 + 1.0 + 3 * 5.0)  # a x2, b, then det x3 in one batch


def test_serve_multiplexing_is_simulated_lru_by_count_batch_windows_and_a_host_cache():
    """One multiplexed deployment holding one model: calls alternating a, b in one window are split by model, each
    a switch; the load function's host cache turns the second load of a into a copy; K = 2 holds both."""
    experts = {e: SimExpert(10 * MB, 1.0, 0.0, load_from_host_ms=2.0, load_from_disk_ms=20.0) for e in ("a", "b")}
    reqs = [SimRequest(0.0, (e,)) for e in "abab"] + [SimRequest(100.0, ("a",))]

    def mux(k: int, cache: int | None):
        d = ServeDeployment(experts=("a", "b"), max_models=k, max_batch_size=8, batch_wait_ms=10.0,
                            host_cache_bytes=cache)
        return PolicySpec(label="mux", assign=AssignPolicy.SINGLE, arrange=ArrangePolicy.FCFS,
                          evict=EvictionPolicy.LRU, serve_multiplexed=(d,))
    k1 = simulate(experts, reqs, config(warm_start=False), mux(1, 0))
    assert k1.switches == k1.loads_from_disk == 3  # window [a b a b] -> a (load), b (evicts a); then a again
    cached = simulate(experts, reqs, config(warm_start=False), mux(1, None))
    assert (cached.loads_from_disk, cached.loads_from_host) == (2, 1)
    k2 = simulate(experts, reqs, config(warm_start=False), mux(2, 0))
    assert k2.switches == 2 and k2.num_batches == 3 and k2.p50_ms >= 10.0  # every call waits for its window


def test_warm_start_needs_no_load_for_the_most_used_experts():
    experts, reqs = workload()
    result = simulate(experts, [r for r in reqs if r.chain == ("e0",)][:50], config(warm_start=True),
                      POLICIES["fcfs_lru"])
    assert result.switches == 0


def test_same_inputs_same_results():
    experts, reqs = workload(seed=5)
    first = {k: r.to_dict() for k, r in simulate_policies(experts, reqs, config()).items()}
    again = {k: r.to_dict() for k, r in simulate_policies(*workload(seed=5), config()).items()}
    other = {k: r.to_dict() for k, r in simulate_policies(*workload(seed=6), config()).items()}
    assert first == again
    assert first != other


def test_custom_policy_and_bad_inputs_are_named():
    experts, reqs = workload()
    fifo_rr = PolicySpec(label="rr fifo", assign=AssignPolicy.ROUND_ROBIN, arrange=ArrangePolicy.FCFS,
                         evict=EvictionPolicy.FIFO)
    assert simulate(experts, reqs, config(), fifo_rr).num_executors == 2
    with pytest.raises(InvalidArgument, match="larger than an executor's pool") as info:
        simulate(experts, reqs, config(device_mb=15), fifo_rr)  # 7.5 MB pools
    assert info.value.field == "device_budget_bytes"
    with pytest.raises(InvalidArgument, match="no costs") as info:
        simulate(experts, [SimRequest(0.0, ("nope",))], config(), fifo_rr)
    assert info.value.field == "requests"
    with pytest.raises(InvalidArgument, match="no requests"):
        simulate(experts, [], config(), fifo_rr)


def test_experts_from_a_profile_carry_its_measured_costs():
    fit = LatencyFit(k_ms_per_item=2.0, b_ms=5.0, r2=1.0, num_points=3)
    moves = [MoveTiming(source="disk", target="host", median_s=0.3, min_s=0.3, max_s=0.3, num_runs=1),
             MoveTiming(source="host", target="device", median_s=0.02, min_s=0.02, max_s=0.02, num_runs=1)]

    batch = BatchTiming(batch_size=8, median_ms=21.0, p10_ms=21.0, p90_ms=21.0, num_runs=1, peak_bytes=20 * MB)

    def entry(name: str) -> ExpertProfile:
        return ExpertProfile(expert=name, device="cuda", device_name="gpu", checkpoint_sha256="0", versions={},
                             measured_at="now", num_parameters=1, footprint_bytes=10 * MB, batches=[batch], fit=fit,
                             max_useful_batch=8, moves=moves if name == "b" else [], seconds=1.0)
    store = ProfileStore(spec="s", usage=UsageProfile(source="spec", num_requests=0, usage={"a": 1.0, "b": 0.3},
                                                      edges=[EdgeWeight(upstream="a", downstream="b",
                                                                        kind="dependency", probability=0.3)]))
    for name in ("a", "b"):
        store.put(entry(name))
    experts = experts_from_profile(store, "cuda")
    b = experts["b"]
    assert (b.k_ms_per_item, b.b_ms, b.max_batch, b.usage, b.upstreams) == (2.0, 5.0, 8, 0.3, frozenset({"a"}))
    assert b.load_from_host_ms == pytest.approx(20.0) and b.load_from_disk_ms == pytest.approx(320.0)
    assert experts["a"].load_from_disk_ms is None  # not measured: the config's bandwidths apply
    result = simulate(experts, [SimRequest(0.0, ("a", "b"))], config(), POLICIES["fcfs_lru"])
    assert result.makespan_ms == pytest.approx(100.0 + 7.0 + 320.0 + 7.0)  # a from disk by bandwidth, b measured
    with pytest.raises(InvalidArgument, match="no entries for device"):
        experts_from_profile(store, "cpu")


def test_a_closed_loop_keeps_at_most_one_request_per_station_in_flight_and_pays_the_turnaround():
    experts = {"a": SimExpert(10 * MB, 10.0, 0.0, max_batch=1)}  # 10 ms a call, one at a time
    reqs = [SimRequest(0.0, ("a",)) for _ in range(40)]
    one = simulate(experts, reqs, config(closed_loop_stations=1, warm_start=True), POLICIES["fcfs_lru"])
    assert one.makespan_ms == pytest.approx(400.0) and one.p50_ms == pytest.approx(10.0)  # one after another
    four = simulate(experts, reqs, config(closed_loop_stations=4, warm_start=True), POLICIES["fcfs_lru"])
    assert four.makespan_ms == pytest.approx(400.0) and four.p50_ms == pytest.approx(40.0)  # 4 queued at a time
    slow = simulate(experts, reqs, config(closed_loop_stations=1, turnaround_ms=10.0, warm_start=True), POLICIES["fcfs_lru"])
    assert slow.makespan_ms == pytest.approx(40 * 10.0 + 39 * 10.0)  # the device waits for each station's turnaround
    hidden = simulate(experts, reqs, config(closed_loop_stations=4, turnaround_ms=10.0, warm_start=True), POLICIES["fcfs_lru"])
    assert hidden.makespan_ms == pytest.approx(400.0, rel=0.05)  # other stations' calls fill the turnaround
