"""Arrange and split inside a pooled host (experts/arrange.py, pure)."""

from __future__ import annotations

from expertmesh.experts.arrange import ArrangePolicy, next_batch

MAX = {"a": 8, "b": 8, "c": 8}


def test_a_resident_expert_goes_before_a_larger_group_that_needs_a_switch():
    queue = {"a": [1.0, 1.1], "b": [0.9, 1.0, 1.0, 1.2]}
    pick = next_batch(ArrangePolicy.COSERVE, queue, {"a"}, now_s=1.3, max_wait_s=1.0, max_batch=MAX)
    assert (pick.expert, pick.num_calls, pick.reason) == ("a", 2, "resident")


def test_without_a_resident_group_the_largest_pays_for_its_switch():
    queue = {"a": [1.0], "b": [1.1, 1.2, 1.2]}
    pick = next_batch(ArrangePolicy.COSERVE, queue, set(), now_s=1.3, max_wait_s=1.0, max_batch=MAX)
    assert (pick.expert, pick.reason) == ("b", "largest")


def test_the_wait_is_bounded_by_the_oldest_call():
    queue = {"a": [5.0, 5.1], "c": [3.0]}
    pick = next_batch(ArrangePolicy.COSERVE, queue, {"a"}, now_s=5.2, max_wait_s=2.0, max_batch=MAX)
    assert (pick.expert, pick.reason) == ("c", "oldest_waited")


def test_split_by_best_batch_and_free_memory_but_always_one():
    queue = {"a": [0.0] * 20}
    assert next_batch(ArrangePolicy.COSERVE, queue, {"a"}, 0.1, max_wait_s=1, max_batch=MAX).num_calls == 8
    pick = next_batch(ArrangePolicy.COSERVE, queue, {"a"}, 0.1, max_wait_s=1, max_batch=MAX, free_bytes=300,
                      activation_bytes={"a": 100})
    assert pick.num_calls == 3
    pick = next_batch(ArrangePolicy.COSERVE, queue, {"a"}, 0.1, max_wait_s=1, max_batch=MAX, free_bytes=10,
                      activation_bytes={"a": 100})
    assert pick.num_calls == 1


def test_fcfs_baseline_and_an_empty_queue():
    queue = {"a": [2.0], "b": [1.0, 3.0]}
    pick = next_batch(ArrangePolicy.FCFS, queue, {"a"}, 3.5, max_wait_s=10, max_batch=MAX)
    assert (pick.expert, pick.num_calls, pick.reason) == ("b", 1, "fcfs")  # b@1.0, then a@2.0 breaks the run
    pick = next_batch(ArrangePolicy.FCFS, {"a": [2.0], "b": [1.0, 1.5]}, set(), 3.5, max_wait_s=10, max_batch=MAX)
    assert (pick.expert, pick.num_calls) == ("b", 2)
    assert next_batch(ArrangePolicy.COSERVE, {"a": []}, set(), 0.0, max_wait_s=1, max_batch=MAX) is None
