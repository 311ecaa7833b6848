"""Pure memory policies of a pooled host: making room within device and host budgets, and prefetch."""

from __future__ import annotations

from expertmesh.experts.eviction import EvictionPolicy, EvictionReason, ResidentExpert
from expertmesh.experts.prefetch import prefetch
from expertmesh.experts.tiering import HostCopy, PoolSnapshot, make_room

MB = 2**20


def dev(name, mb, used=0.0, busy=False, usage=0.0):
    return ResidentExpert(name, mb * MB, last_used_s=used, loaded_s=used, busy=busy, usage=usage)


def snap(device, host=(), device_mb=None, host_mb=None, running=()):
    return PoolSnapshot(list(device), list(host), None if device_mb is None else device_mb * MB,
                        None if host_mb is None else host_mb * MB, running=frozenset(running))


def test_it_fits_without_moving_anything():
    plan = make_room(EvictionPolicy.COSERVE, snap([dev("a", 10)], device_mb=30), "b", 10 * MB, in_host=True, upstreams={})
    assert plan.evictions == () and plan.host_drops == () and plan.keep_host_copy


def test_coserve_evicts_an_orphaned_downstream_before_a_rarely_used_one():
    device = [dev("rare", 10, used=1, usage=0.01), dev("detector", 20, used=5, usage=0.5), dev("small_down", 5, used=9)]
    plan = make_room(EvictionPolicy.COSERVE, snap(device, device_mb=40), "new", 15 * MB, in_host=True,
                     upstreams={"detector": {"gone_upstream"}, "small_down": {"gone_upstream"}})
    assert [(e.expert, e.reason) for e in plan.evictions] == [("detector", EvictionReason.ORPHANED_DOWNSTREAM)]


def test_lru_evicts_the_least_recently_used():
    device = [dev("a", 10, used=5), dev("b", 10, used=1), dev("c", 10, used=3)]
    plan = make_room(EvictionPolicy.LRU, snap(device, device_mb=30), "d", 15 * MB, in_host=True, upstreams={})
    assert [e.expert for e in plan.evictions] == ["b", "c"]


def test_queued_experts_stay_unless_nothing_else_can_go_and_the_running_one_never_goes():
    device = [dev("queued", 10, used=0, busy=True), dev("idle", 10, used=9)]
    plan = make_room(EvictionPolicy.LRU, snap(device, device_mb=20), "new", 10 * MB, in_host=True, upstreams={})
    assert [e.expert for e in plan.evictions] == ["idle"]  # the older one has queued work: kept
    all_queued = [dev("a", 10, busy=True), dev("b", 10, used=1, busy=True)]
    plan = make_room(EvictionPolicy.LRU, snap(all_queued, device_mb=20, running={"a"}), "new", 10 * MB,
                     in_host=True, upstreams={})
    assert [e.expert for e in plan.evictions] == ["b"]  # no idle expert: a queued one goes, never the running one


def test_an_expert_larger_than_the_device_budget_cannot_be_placed():
    assert make_room(EvictionPolicy.COSERVE, snap([], device_mb=10), "big", 20 * MB, in_host=False, upstreams={}) is None
    running_only = snap([dev("a", 10)], device_mb=10, running={"a"})
    assert make_room(EvictionPolicy.COSERVE, running_only, "b", 5 * MB, in_host=True, upstreams={}) is None


def test_host_copies_of_experts_off_the_device_make_room_lru_first():
    device = [dev("on", 10)]
    host = [HostCopy("on", 10 * MB, 0.0), HostCopy("old", 10 * MB, 1.0), HostCopy("newer", 10 * MB, 2.0)]
    plan = make_room(EvictionPolicy.LRU, snap(device, host, host_mb=30), "new", 10 * MB, in_host=False, upstreams={})
    assert plan.host_drops == ("old",) and plan.keep_host_copy  # the copy of the expert on the device stays
    plan = make_room(EvictionPolicy.LRU, snap(device, host[:1], host_mb=15), "new", 10 * MB, in_host=False,
                     upstreams={})
    assert plan.host_drops == () and not plan.keep_host_copy  # cannot hold it: read from disk, not kept
    plan = make_room(EvictionPolicy.LRU, snap(device, host, host_mb=30), "new", 10 * MB, in_host=True, upstreams={})
    assert plan.host_drops == ()  # its host copy is already counted


def test_coserve_keeps_the_likely_experts_in_host_memory():
    host = [HostCopy("rare_recent", 10 * MB, 9.0, usage=0.01), HostCopy("common_old", 10 * MB, 1.0, usage=0.5)]
    plan = make_room(EvictionPolicy.COSERVE, snap([], host, host_mb=20), "new", 10 * MB, in_host=False, upstreams={})
    assert plan.host_drops == ("rare_recent",)
    plan = make_room(EvictionPolicy.LRU, snap([], host, host_mb=20), "new", 10 * MB, in_host=False, upstreams={})
    assert plan.host_drops == ("common_old",)


def test_prefetch_loads_likely_downstream_experts_into_free_memory_only():
    sizes = {"likely": 10, "unlikely": 10, "big": 100, "resident": 10}
    down = {"likely": 0.6, "unlikely": 0.01, "big": 0.9, "resident": 0.9}
    assert prefetch(down, 1, on_device={"resident"}, num_bytes=sizes, free_device_bytes=50) == ["likely"]
    assert prefetch(down, 1, on_device={"resident"}, num_bytes=sizes, free_device_bytes=None) == ["big", "likely"]
    # 100 calls make even a 1% trigger near certain to fire at least once
    assert prefetch(down, 100, on_device={"resident"}, num_bytes=sizes, free_device_bytes=25) == ["likely", "unlikely"]
    assert prefetch(down, 1, on_device=set(), num_bytes=sizes, free_device_bytes=5) == []
