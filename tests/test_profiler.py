"""The profiler: fit and batch choice on synthetic timings, the store, staleness, usage weights (pure);
then two tiny experts profiled for real, and the serving options a profile produces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expertmesh.deployments.config import AppArgs, ServeSettings, app_options, deployment_options
from expertmesh.errors import InvalidArgument
from expertmesh.experts.graph import usage_probabilities
from expertmesh.experts.spec import resolve_checkpoint
from expertmesh.profiler import usage
from expertmesh.profiler.fit import batch_sizes_up_to, fit_linear, largest_useful_batch
from expertmesh.profiler.measure import MeasureConfig
from expertmesh.profiler.run import format_profiles, profile_zoo
from expertmesh.profiler.serving_profiles import usable_profiles
from expertmesh.profiler.store import (BatchTiming, ExpertProfile, LatencyFit, MoveTiming, ProfileStore,
                                       stale_reasons)


# ---------------------------------------------------------------------- fit
@pytest.mark.parametrize("k, b", [(0.25, 1.5), (2.0, 0.1), (0.01, 12.0)])
def test_fit_recovers_known_k_and_b(k, b):
    rng = np.random.default_rng(0)
    sizes = [1, 2, 4, 8, 16, 32]
    lat = [k * n + b + rng.normal(0, 0.002 * (k * n + b)) for n in sizes]
    fit = fit_linear(sizes, lat)
    assert fit.k_ms_per_item == pytest.approx(k, rel=0.03) and fit.b_ms == pytest.approx(b, rel=0.05, abs=0.02)
    assert fit.r2 > 0.99 and fit.num_points == 6 and fit.predict_ms(10) == pytest.approx(10 * k + b, rel=0.03)


def _machine_like_timings(rng: np.random.Generator, sizes: list[int]) -> list[float]:
    """Medians shaped like this 2-core machine's profiles: K 0.05-3 ms per image, B 0-2 ms, each median off by a
    few percent, and now and then one batch size much slower (another process took the core)."""
    k, b = rng.uniform(0.05, 3.0), rng.uniform(0.0, 2.0)
    lat = [(k * n + b) * rng.lognormal(0.0, 0.06) for n in sizes]
    if rng.random() < 0.3:
        i = int(rng.integers(len(sizes)))
        lat[i] *= rng.uniform(1.2, 2.0)
    return lat


def test_fits_of_noisy_timings_are_always_valid_cost_models():
    """1,000 seeded noisy profiles: plain least squares gives a negative B on a sizeable share of them (what
    crashed the planner); the bounded fit never does, and stays close to the truth where the noise is small."""
    sizes = [1, 2, 4, 8, 16, 32]
    negative_plain = 0
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        lat = _machine_like_timings(rng, sizes)
        fit = fit_linear(sizes, lat)
        assert fit.k_ms_per_item > 0 and fit.b_ms >= 0 and fit.problems() == [], (seed, fit)
        k_plain, b_plain = np.polyfit(sizes, lat, 1)
        negative_plain += b_plain < 0
    assert negative_plain > 50  # the failure mode is real on timings of this shape


def test_fit_at_the_bounds():
    flat = fit_linear([1, 2, 4], [3.0, 3.0, 3.0])  # no marginal cost measured: K at its floor, B the latency
    assert 0 < flat.k_ms_per_item < 1e-3 and flat.b_ms == pytest.approx(3.0, rel=1e-3)
    through_zero = fit_linear([1, 2, 4, 8], [1.0, 1.9, 4.1, 8.4])  # would fit B < 0: B is 0
    assert through_zero.b_ms == 0.0 and through_zero.k_ms_per_item == pytest.approx(1.03, rel=0.05)
    with pytest.raises(ValueError, match="positive and finite"):
        fit_linear([1, 2], [1.0, float("nan")])


def test_fit_needs_two_batch_sizes():
    with pytest.raises(ValueError, match="two distinct batch sizes"):
        fit_linear([4, 4], [1.0, 1.1])


def test_largest_useful_batch_stops_where_per_item_time_stops_improving():
    sizes = [1, 2, 4, 8, 16, 32]
    lat = [10.0, 11.0, 13.0, 17.0, 33.0, 66.0]  # per item 10, 5.5, 3.25, 2.125, 2.0625, 2.0625
    assert largest_useful_batch(sizes, lat) == 8  # within 5% of the best
    assert largest_useful_batch(sizes, lat, min_gain=0.0) == 16  # the first to reach the best
    peaks = [1, 2, 4, 8, 16, 32]
    assert largest_useful_batch(sizes, lat, peak_bytes=peaks, memory_limit_bytes=5) == 4  # memory runs out first
    assert largest_useful_batch([1, 2], [1.0, 2.0]) == 1  # no gain at all
    noisy = [10.0, 21.0, 13.0, 17.0, 33.0, 66.0]  # one slow point at n=2 does not end the search
    assert largest_useful_batch(sizes, noisy) == 8


def test_batch_sizes_are_powers_of_two_up_to_the_max():
    assert batch_sizes_up_to(32) == [1, 2, 4, 8, 16, 32]
    assert batch_sizes_up_to(24) == [1, 2, 4, 8, 16, 24]


# ---------------------------------------------------------------------- store and staleness
def _profile(expert="chip_defect", device="cpu", sha="a" * 64, best=8) -> ExpertProfile:
    batches = [BatchTiming(batch_size=n, median_ms=n * 0.5 + 2, p10_ms=n * 0.5 + 1.9, p90_ms=n * 0.5 + 2.2,
                           num_runs=5, peak_bytes=1000 * n) for n in (1, 2, 4, 8)]
    return ExpertProfile(expert=expert, device=device, device_name="cpu-x (2 cpus)", checkpoint_sha256=sha,
                         versions={"torch": "2.13.0", "transformers": "5.23.0", "python": "3.11.7"},
                         measured_at="2026-11-22T00:00:00+00:00", num_parameters=10, footprint_bytes=40, batches=batches,
                         fit=LatencyFit(k_ms_per_item=0.5, b_ms=2.0, r2=1.0, num_points=4), max_useful_batch=best,
                         moves=[MoveTiming(source="disk", target="host", median_s=0.01, min_s=0.009, max_s=0.02, num_runs=3)],
                         seconds=1.0)


def test_store_round_trip(tmp_path, default_spec):
    store = ProfileStore(spec="pcb-aoi", usage=usage.from_spec(default_spec))
    store.put(_profile())
    store.put(_profile(device="cuda"))
    store.save(tmp_path / "p.json")
    back = ProfileStore.load(tmp_path / "p.json")
    assert back == store and back.get("chip_defect", "cuda").device == "cuda" and back.get("polarity", "cpu") is None
    assert "chip_defect" in format_profiles(back)


def test_a_bad_store_is_a_clear_error(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"schema_version": 99, "spec": "x"}))
    with pytest.raises(InvalidArgument, match="profile --force"):
        ProfileStore.load(tmp_path / "p.json")
    with pytest.raises(InvalidArgument, match="expertmesh profile"):
        ProfileStore.load(tmp_path / "missing.json")


def test_staleness_names_what_changed():
    p = _profile()
    same = dict(checkpoint_hash="a" * 64, versions=dict(p.versions), device="cpu-x (2 cpus)")
    assert stale_reasons(p, **same) == []
    assert stale_reasons(p, **{**same, "checkpoint_hash": "b" * 64}) == ["checkpoint changed"]
    assert stale_reasons(p, **{**same, "versions": {**p.versions, "torch": "2.14.0"}}) == ["torch 2.13.0 -> 2.14.0"]
    assert stale_reasons(p, **{**same, "device": "other cpu"}) == ["device 'cpu-x (2 cpus)' -> 'other cpu'"]


def test_an_invalid_entry_is_stale_and_refused_naming_the_expert_the_value_and_the_fix():
    """A profile written by the old unconstrained fit (B < 0): `expertmesh profile` measures it again (it is stale),
    serving and planning leave it out, and a consumer that gets it anyway is told which expert, which value, what
    to run - never a traceback from a cost model's validation."""
    from expertmesh.cluster.demand import expert_cost
    from expertmesh.errors import FailedPrecondition

    p = _profile(expert="soic_defect")
    bad = p.model_copy(update={"fit": LatencyFit(k_ms_per_item=0.5, b_ms=-0.26, r2=0.99, num_points=4)})
    same = dict(checkpoint_hash="a" * 64, versions=dict(p.versions), device="cpu-x (2 cpus)")
    assert stale_reasons(bad, **same) == ["fit B = -0.26 ms per batch is negative"]
    with pytest.raises(FailedPrecondition) as info:
        expert_cost(bad)
    msg = str(info.value)
    assert "soic_defect@cpu" in msg and "-0.26" in msg and "expertmesh profile --force" in info.value.fix
    assert expert_cost(p).b_ms_per_batch == 2.0


# ---------------------------------------------------------------------- usage weights
def test_usage_from_the_spec_mix_matches_the_graph(default_spec):
    u = usage.from_spec(default_spec)
    assert u.usage == pytest.approx(usage_probabilities(default_spec))
    w = {(e.upstream, e.downstream): e.probability for e in u.edges}
    router = default_spec.router.expert
    chip_share = sum(c.probability for c in default_spec.categories if "chip_defect" in c.experts)
    assert w[(router, "chip_defect")] == pytest.approx((1 - default_spec.router.expected_fallback_probability) * chip_share)
    assert w[("diode_defect", "polarity")] < u.usage["diode_defect"]


def test_usage_counted_from_traces(default_spec, tmp_path):
    r = default_spec.router.expert
    records = ([{"experts": [{"expert": r, "reason": "router"}, {"expert": "diode_defect", "reason": "table"},
                             {"expert": "polarity", "reason": "dependency", "because_of": "diode_defect"}]}] * 3
               + [{"experts": [{"expert": r, "reason": "router"}, {"expert": "chip_defect", "reason": "table"}]}])
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in records) + "\n")
    u = usage.from_traces(default_spec, path)
    assert u.num_requests == 4 and u.usage[r] == 1.0 and u.usage["polarity"] == 0.75 and u.usage["chip_defect"] == 0.25
    w = {(e.upstream, e.downstream): e.probability for e in u.edges}
    assert w == {(r, "diode_defect"): 0.75, ("diode_defect", "polarity"): 0.75, (r, "chip_defect"): 0.25}
    g = usage.weighted_graph(default_spec, u)
    assert g.edges["diode_defect", "polarity"]["weight"] == 0.75 and g.nodes["polarity"]["usage"] == 0.75
    assert g.edges["soic_defect", "polarity"]["weight"] == 0.0
    path.write_text("not json\n")
    with pytest.raises(InvalidArgument, match="t.jsonl:1"):
        usage.from_traces(default_spec, path)


# ---------------------------------------------------------------------- serving options from a profile
def test_a_profile_sets_each_experts_batch_size_on_its_host(default_spec):
    settings = ServeSettings()
    plain = deployment_options(default_spec, settings)["Host"]["user_config"]["max_batch"]
    profiled = deployment_options(default_spec, settings, {"chip_defect": _profile(best=8)})["Host"]["user_config"]
    assert plain["chip_defect"] == default_spec.expert("chip_defect").max_batch
    assert profiled["max_batch"]["chip_defect"] == 8 and profiled["max_batch"]["polarity"] == plain["polarity"]


# ---------------------------------------------------------------------- for real, on two tiny experts
@pytest.mark.integration
def test_two_tiny_experts_profiled_for_real(tiny_spec, tiny_zoo, tmp_path):
    store_path = tmp_path / "profile.json"
    cfg = MeasureConfig(runs=3, warmup_runs=1, move_runs=2, max_batch=4)
    logs: list[str] = []
    store = profile_zoo(tiny_spec, tiny_zoo, store_path, devices=["cpu"], experts=["chip_defect", "polarity"],
                        cfg=cfg, progress=False, log=logs.append)
    assert sorted(store.entries) == ["chip_defect@cpu", "polarity@cpu"]
    for p in store.entries.values():
        assert [b.batch_size for b in p.batches] == [1, 2, 4]
        assert all(b.median_ms > 0 and b.p10_ms <= b.median_ms <= b.p90_ms and b.num_runs == 3 for b in p.batches)
        assert p.footprint_bytes > 0 and p.batches[-1].peak_bytes > p.batches[0].peak_bytes > p.footprint_bytes
        assert {(m.source, m.target) for m in p.moves} == {("disk", "host"), ("host", "device"), ("device", "host"),
                                                           ("device", "disk")}
        assert 1 <= p.max_useful_batch <= 4 and p.fit.num_points == 3
    assert ProfileStore.load(store_path) == store

    # current entries are skipped; a changed checkpoint makes its entry stale: reported and measured again
    logs.clear()
    profile_zoo(tiny_spec, tiny_zoo, store_path, devices=["cpu"], experts=["chip_defect", "polarity"], cfg=cfg,
                progress=False, log=logs.append)
    assert any("is current" in line for line in logs)
    ckpt = resolve_checkpoint(tiny_spec.expert("polarity"), tiny_zoo)
    before = store.get("polarity", "cpu").checkpoint_sha256
    with open(ckpt / "config.json", "a") as fh:
        fh.write("\n")
    warnings: list[str] = []
    assert "polarity" not in usable_profiles(ProfileStore.load(store_path), tiny_spec, tiny_zoo, "cpu", warn=warnings.append)
    assert warnings and "checkpoint changed" in warnings[0]
    logs.clear()
    store = profile_zoo(tiny_spec, tiny_zoo, store_path, devices=["cpu"], experts=["polarity"], cfg=cfg,
                        progress=False, log=logs.append)
    assert any("stale profile polarity@cpu: checkpoint changed" in line for line in logs)
    assert store.get("polarity", "cpu").checkpoint_sha256 != before

    # the serving path takes the current entries
    args = AppArgs(zoo=str(tiny_zoo), tokens_file="unused", profile=str(store_path))
    opts = app_options(tiny_spec, args)
    assert opts["Host"]["user_config"]["max_batch"]["chip_defect"] == store.get("chip_defect", "cpu").max_useful_batch

    # the plot
    from expertmesh.profiler.plot import plot_profiles

    png = plot_profiles(list(store.entries.values()), tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
