"""The fast path's pure parts (no Ray): plans in waves, batch splits, and resizing once at the ingress."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from expertmesh.experts.images import resize_for
from expertmesh.experts.pool import split_batches
from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.router.plan import Call, ExpertOutput, Reason, route
from expertmesh.router.waves import PlanInFlight, merge, record, take_calls


def _dependency(spec):
    d = spec.dependencies[0]
    return d.upstream, d.downstream, d.on_labels[0]


def test_a_wave_groups_every_plans_pending_calls_by_expert(default_spec):
    up, down, label = _dependency(default_spec)
    plans = {0: PlanInFlight.start([Call(up, Reason.TABLE)]), 1: PlanInFlight.start([Call(up, Reason.TABLE)]),
             2: PlanInFlight.start([Call(down, Reason.TABLE)])}
    wave = take_calls(plans)
    assert [k for k, _ in wave[up]] == [0, 1] and [k for k, _ in wave[down]] == [2]
    assert all(p.finished for p in plans.values())
    # an output that triggers its downstream adds the call to that plan only, and only once
    new = record(default_spec, plans[0], wave[up][0][1], ExpertOutput(up, label, 0.9))
    assert [c.expert for c in new] == [down] and new[0].because_of == up
    assert record(default_spec, plans[0], new[0], ExpertOutput(up, label, 0.9)) == []  # already planned
    record(default_spec, plans[2], wave[down][0][1], ExpertOutput(down, "ok", 0.9))
    assert [c.expert for c in plans[0].pending] == [down] and plans[2].finished


def test_calls_a_runner_cannot_run_stay_pending(default_spec):
    up, down, _ = _dependency(default_spec)
    plans = {0: PlanInFlight.start([Call(up, Reason.TABLE), Call(down, Reason.TABLE)])}
    wave = take_calls(plans, lambda e: e == up)
    assert list(wave) == [up] and [c.expert for c in plans[0].pending] == [down]


def test_merge_drops_calls_made_or_pending_already(default_spec):
    up, down, _ = _dependency(default_spec)
    plan = PlanInFlight.start([])
    merge(plan, [(Call(up, Reason.TABLE), ExpertOutput(up, "x", 0.5))], [Call(down, Reason.DEPENDENCY, up)], [up, down])
    merge(plan, [], [Call(down, Reason.DEPENDENCY, up), Call(up, Reason.TABLE)], [])  # a second host's copy
    assert [c.expert for c in plan.pending] == [down] and plan.planned == {up, down}


def test_the_waves_run_the_same_plans_as_the_route(default_spec):
    r = route(default_spec, default_spec.categories[0].name, 0.99)
    plan = PlanInFlight.start(r.calls)
    assert [c.expert for _, calls in take_calls({0: plan}).items() for _, c in calls] == sorted(
        c.expert for c in r.calls)


@pytest.mark.parametrize("n, max_batch, sizes", [(0, 8, []), (5, 8, [5]), (8, 8, [8]), (70, 64, [35, 35]),
                                                 (17, 8, [6, 6, 5])])
def test_batches_split_evenly_within_the_best_batch(n, max_batch, sizes):
    parts = split_batches(n, max_batch)
    assert [p.stop - p.start for p in parts] == sizes
    assert sum(sizes) == n and all(parts[i].stop == parts[i + 1].start for i in range(len(parts) - 1))
    with pytest.raises(ValueError, match="at least 1"):
        split_batches(3, 0)


def test_resizing_once_at_the_ingress_gives_each_expert_the_pixels_it_would_get_offline():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (120, 110, 3), dtype=np.uint8))
    sized = resize_for(img, [96, 64, 64])
    assert sorted(sized) == [64, 96] and sized[64].shape == (64, 64, 3) and sized[96].dtype == np.uint8
    for size in (64, 96):
        direct = to_pixel_values([img], size)
        shipped = to_pixel_values(np.stack([sized[size]]), size)
        assert torch_equal(direct, shipped)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
