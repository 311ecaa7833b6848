"""Dependency-aware eviction (experts/eviction.py, pure): CoServe's two stages, the baselines, never busy work."""

from __future__ import annotations

from expertmesh.experts.eviction import EvictionPolicy, EvictionReason, ResidentExpert, choose_evictions, eviction_order

MB = 1 << 20
# a classifier `cls` triggers `det` (a shared detector) and `pol`; `det` triggers `fine`
UPSTREAMS = {"det": {"cls"}, "pol": {"cls"}, "fine": {"det"}}


def expert(name, mb, used, loaded=0.0, busy=False, usage=0.5):
    return ResidentExpert(name, mb * MB, last_used_s=used, loaded_s=loaded, busy=busy, usage=usage)


def test_orphaned_downstream_experts_go_first_largest_first():
    resident = [expert("pol", 10, used=9, usage=0.9), expert("fine", 30, used=8, usage=0.9),
                expert("det", 20, used=7, usage=0.9), expert("other", 5, used=1, usage=0.01)]
    # cls is not resident: pol and det are orphaned (their upstream is gone); fine still has det
    order = eviction_order(EvictionPolicy.COSERVE, resident, UPSTREAMS)
    assert [(e.name, r) for e, r in order[:2]] == [("det", EvictionReason.ORPHANED_DOWNSTREAM),
                                                   ("pol", EvictionReason.ORPHANED_DOWNSTREAM)]
    assert [e.name for e, _ in order[2:]] == ["other", "fine"]  # then by usage: other (0.01) before fine (0.9)


def test_evicting_an_upstream_orphans_its_downstream_next():
    resident = [expert("det", 20, used=5, usage=0.05), expert("fine", 30, used=9, usage=0.9),
                expert("cls", 40, used=9, usage=1.0), expert("x", 10, used=9, usage=0.5)]
    picks = choose_evictions(EvictionPolicy.COSERVE, resident, UPSTREAMS, need_bytes=45 * MB, free_bytes=0)
    # det has its upstream (cls) resident, so it goes as the lowest usage; that orphans fine, which goes next
    assert [(p.expert, p.reason) for p in picks] == [("det", EvictionReason.LOW_USAGE),
                                                     ("fine", EvictionReason.ORPHANED_DOWNSTREAM)]


def test_busy_and_protected_experts_are_never_evicted():
    resident = [expert("a", 10, used=1, busy=True), expert("b", 10, used=2), expert("c", 10, used=3)]
    picks = choose_evictions(EvictionPolicy.LRU, resident, {}, need_bytes=15 * MB, free_bytes=0, protect={"b"})
    assert picks is None  # only c can go, and 10 MB is not enough: wait instead of overrunning the budget
    picks = choose_evictions(EvictionPolicy.LRU, resident, {}, need_bytes=10 * MB, free_bytes=0, protect={"b"})
    assert [p.expert for p in picks] == ["c"]


def test_nothing_is_evicted_when_it_fits_already():
    assert choose_evictions(EvictionPolicy.COSERVE, [expert("a", 10, used=1)], {}, need_bytes=MB, free_bytes=MB) == []


def test_lru_and_fifo_baselines():
    resident = [expert("a", 10, used=5, loaded=1), expert("b", 10, used=1, loaded=3), expert("c", 10, used=3, loaded=2)]
    assert [e.name for e, _ in eviction_order(EvictionPolicy.LRU, resident, UPSTREAMS)] == ["b", "c", "a"]
    assert [e.name for e, _ in eviction_order(EvictionPolicy.FIFO, resident, UPSTREAMS)] == ["a", "c", "b"]
    picks = choose_evictions(EvictionPolicy.FIFO, resident, {}, need_bytes=20 * MB, free_bytes=0)
    assert [(p.expert, p.reason) for p in picks] == [("a", EvictionReason.FIFO), ("c", EvictionReason.FIFO)]
