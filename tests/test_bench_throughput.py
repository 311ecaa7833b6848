"""`expertmesh bench throughput`: its pure parts (points, the adaptive sweep, capacity, overload, the table) without
Ray, and a tiny sweep of single Inspect and boards against the shared serving fixture so the command cannot rot."""

from __future__ import annotations

import json

import pytest

from expertmesh.bench.throughput_run import ThroughputSettings, run_throughput
from expertmesh.bench.throughput_sweep import (DEADLINE, OK, REFUSED, PointResult, RequestRecord, SweepRule, capacity,
                                               highest_rate_meeting, meets_target, next_rate, num_requests_for,
                                               overload_figures, percentile_ms, send_offsets_s, summarize_point)
from expertmesh.bench.throughput_table import headline_rows, markdown, sweep_summary
from expertmesh.cli import build_parser
from expertmesh.experts.spec import load_spec


def point(offered: float, achieved: float | None = None, p99_ms: float = 100.0, errors: dict | None = None,
          p50_ms: float = 50.0) -> PointResult:
    achieved = offered if achieved is None else achieved
    return PointResult(offered_per_s=offered, num_sent=100, sent_per_s=offered, num_ok=100, achieved_per_s=achieved,
                       achieved_components_per_s=achieved, p50_ms=p50_ms, p99_ms=p99_ms, errors_by_code=errors or {})


RULE = SweepRule(start_per_s=10, target_p99_ms=250)


def test_open_loop_schedule_and_request_counts():
    assert send_offsets_s(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert num_requests_for(10, point_s=5, min_requests=200) == 200  # enough for a p99
    assert num_requests_for(100, point_s=5, min_requests=200) == 500  # the point's seconds
    with pytest.raises(ValueError, match="rate_per_s"):
        num_requests_for(0, 5, 200)


def test_percentiles():
    assert percentile_ms([], 99) is None
    assert percentile_ms([1, 2, 3, 4, 5], 50) == 3.0
    assert percentile_ms(list(range(101)), 99) == pytest.approx(99.0)


def test_summarize_point_sustained_saturated_and_errors():
    # 10/s for 2 s, every answer 100 ms later: the offered rate is sustained
    sustained = summarize_point([RequestRecord(i / 10, 100.0, OK, 1) for i in range(20)], 10.0)
    assert sustained.achieved_per_s == pytest.approx(10.0)
    assert sustained.num_ok == 20 and sustained.p99_ms == pytest.approx(100.0) and sustained.errors_by_code == {}
    # sent at 10/s, answered at 5/s (queueing): the server's rate
    slow = summarize_point([RequestRecord(i / 10, 100.0 + i * 100.0, OK, 50) for i in range(20)], 10.0)
    assert slow.achieved_per_s == pytest.approx(20 / 3.8)
    assert slow.achieved_components_per_s == pytest.approx(50 * 20 / 3.8)
    mixed = summarize_point([RequestRecord(0.0, 10.0, OK, 1), RequestRecord(0.1, 5.0, REFUSED, 0),
                             RequestRecord(0.2, 7.0, REFUSED, 0), RequestRecord(0.3, 30000.0, DEADLINE, 0)], 10.0)
    assert mixed.num_ok == 1 and mixed.errors_by_code == {DEADLINE: 1, REFUSED: 2}
    assert mixed.refusal_p99_ms == pytest.approx(6.98)
    assert mixed.p99_ms == 10.0  # latencies are of the answered requests
    assert PointResult.from_dict(mixed.to_dict()) == mixed
    with pytest.raises(ValueError):
        summarize_point([], 1.0)


def test_meets_target():
    assert meets_target(point(10), RULE)
    assert not meets_target(point(10, p99_ms=300), RULE)
    assert not meets_target(point(10, errors={REFUSED: 1}), RULE)
    assert not meets_target(point(10, achieved=8), RULE)  # saturated


def test_sweep_doubles_until_saturated_then_fills_in():
    assert next_rate([], RULE) == 10
    pts = [point(10), point(20)]
    assert next_rate(pts, RULE) == 40
    pts.append(point(40, achieved=30, p99_ms=2000))  # saturated: the ramp stops
    mid = next_rate(pts, RULE)
    assert mid == pytest.approx((20 * 40) ** 0.5)
    pts.append(point(mid, p99_ms=200))  # held the target
    mid2 = next_rate(pts, RULE)
    assert mid > 20 and mid2 == pytest.approx((mid * 40) ** 0.5)
    pts.append(point(mid2, p99_ms=400))
    assert next_rate(pts, RULE) is None  # max_fill_points (2) done
    assert highest_rate_meeting(pts, RULE) == pytest.approx(mid)
    assert capacity(pts).offered_per_s == pytest.approx(mid2)


def test_sweep_stops_on_errors_and_exploding_p99_but_not_on_a_latency_floor():
    assert next_rate([point(10), point(20, errors={REFUSED: 3})], RULE) == pytest.approx((10 * 20) ** 0.5)
    # p99 far over the target and growing: queueing, stop the ramp; nothing saturated yet: probe once for capacity
    queueing = [point(10, p99_ms=400), point(20, p99_ms=1500)]
    assert next_rate(queueing, RULE) == 40
    # saturated now; no point held the target: nothing to fill in
    assert next_rate([*queueing, point(40, achieved=25, p99_ms=9000)], RULE) is None
    # a probe above a ramp that held the target, then the fill-ins between
    probed = [point(10), point(20, p99_ms=1500), point(40, achieved=25, p99_ms=9000)]
    assert next_rate(probed, RULE) == pytest.approx((10 * 20) ** 0.5)
    # the probe runs once, even when it did not saturate the server either
    unsaturated = [point(10), point(20, p99_ms=1500), point(40, p99_ms=3000)]
    assert next_rate(unsaturated, RULE) == pytest.approx((10 * 20) ** 0.5)
    short = SweepRule(start_per_s=10, target_p99_ms=250, max_ramp_points=2)
    assert next_rate([point(10), point(20)], short) == 40  # the ramp's length reached: the probe
    assert next_rate([point(10), point(20), point(40)], short) is None  # every point held the target
    # p99 over 4 targets from the start (a slow, steady server): keep ramping to find its capacity
    board = SweepRule(start_per_s=0.2, target_p99_ms=1000)
    assert next_rate([point(0.2, p99_ms=4500)], board) == pytest.approx(0.4)
    assert next_rate([point(0.2, p99_ms=4500), point(0.4, p99_ms=6000)], board) == pytest.approx(0.8)


def test_sweep_steps_down_once_when_the_start_is_past_capacity():
    assert next_rate([point(10, achieved=4, p99_ms=5000)], RULE) == 5
    assert next_rate([point(10, achieved=4, p99_ms=5000), point(5, p99_ms=5000)], RULE) is None
    ok_below = [point(10, achieved=4, p99_ms=5000), point(5)]
    assert next_rate(ok_below, RULE) == pytest.approx((5 * 10) ** 0.5)


def test_sweep_rule_refuses_bad_values():
    with pytest.raises(ValueError, match="growth_factor"):
        SweepRule(start_per_s=1, target_p99_ms=250, growth_factor=1)


def test_overload_figures():
    cap = point(20)
    over = PointResult(offered_per_s=60, num_sent=300, sent_per_s=60, num_ok=95, achieved_per_s=19,
                       achieved_components_per_s=19, p50_ms=100, p99_ms=240,
                       errors_by_code={REFUSED: 200, DEADLINE: 3, "UNAVAILABLE": 2}, refusal_p99_ms=12.0)
    f = overload_figures(over, cap)
    assert f["fraction_of_capacity"] == pytest.approx(0.95)
    assert (f["num_refused"], f["num_deadline_exceeded"], f["num_other_errors"]) == (200, 3, 2)
    assert f["refusal_p99_ms"] == 12.0


def _doc(commit: str, scale: float) -> dict:
    rule = SweepRule(start_per_s=10, target_p99_ms=250)
    single = [point(10 * scale), point(20 * scale, achieved=15 * scale, p99_ms=900)]
    boards = [point(0.2 * scale, p99_ms=800)]
    for p in boards:
        p.achieved_components_per_s = p.achieved_per_s * 50
    return {"benchmark": "throughput", "commit": commit, "date": "2025-01-01", "machine": {"cpu_count": 2},
            "offline": {"components_per_s": 490.0}, "noop": sweep_summary([point(400)], rule, 1),
            "single": sweep_summary(single, rule, 1),
            "board": sweep_summary(boards, SweepRule(start_per_s=0.2, target_p99_ms=1000), 50),
            "overload": {"single": {**overload_figures(point(45 * scale, achieved=14 * scale), single[1])}, "board": None},
            "startup": {"ray_start_s": 5.0, "ready_s": 90.0},
            "memory": {"weights_bytes": 3 * 2**20, "after_load": {"rss_bytes": 9 * 2**30, "num_processes": 13}}}


def test_summary_table_and_rows_beside_the_design_before():
    doc, before = _doc("a" * 40, 10.0), _doc("b" * 40, 1.0)
    assert doc["single"]["highest_rate_meeting_target_per_s"] == 100.0
    assert doc["board"]["highest_rate_meeting_target_components_per_s"] == 100.0
    rows = dict(headline_rows([doc, before]))
    assert rows["commit"] == ["aaaaaaaaaa", "bbbbbbbbbb"]
    assert rows["single: highest rate with p99 <= 250 ms, requests/s"] == ["100.0", "10.0"]
    assert rows["single: that rate as a share of the no-op's"] == ["25%", "2%"]
    assert rows["boards: that rate in components/s (share of offline bound)"] == ["100.0 (20%)", "10.0 (2%)"]
    assert rows["single: overload throughput, share of capacity"] == ["93%", "93%"]
    assert rows["board: overload refused (RESOURCE_EXHAUSTED) / sent"] == ["-", "-"]
    assert rows["RSS after load beyond the weights"] == ["9,213 MiB", "9,213 MiB"]
    md = markdown(doc, before)
    assert "| figure | this run | before |" in md and "## ExpertMesh, boards of 50" in md
    assert md.count("## No-op Serve gRPC app") == 2
    json.dumps(doc)  # the document is JSON


def test_cli_parses_the_bench_command():
    args = build_parser().parse_args(["bench", "throughput", "--quick", "--out", "x/y", "--before", "b.json"])
    assert args.quick and args.out == "x/y" and args.before == "b.json"
    assert args.func.__name__ == "run"  # loaded on use: parsing imports neither Ray nor torch


def test_quick_settings_are_shorter():
    quick, full = ThroughputSettings.quick(), ThroughputSettings()
    assert quick.point_s < full.point_s and quick.min_singles < full.min_singles
    with pytest.raises(ValueError):
        ThroughputSettings(point_s=0)


@pytest.mark.integration
@pytest.mark.slow
def test_tiny_sweep_against_the_serving_fixture(serving, default_zoo):
    """(c) and (d) against the shared app (an existing target: nothing started); every point answered."""
    token = serving.tokens["factory-a"]
    s = ThroughputSettings(point_s=1.0, min_singles=10, min_boards=2, board_size=5, single_start_per_s=2,
                           board_start_per_s=0.5, max_ramp_points=2, max_fill_points=0, pool_size=20,
                           parts=("single", "board"))
    doc = run_throughput(s, load_spec(), default_zoo, None, target=serving.grpc_target, token=token,
                         factory_id="factory-a")
    for kind, components in (("single", 1), ("board", 5)):
        sweep = doc[kind]
        assert sweep["components_per_request"] == components
        assert 1 <= len(sweep["points"]) <= 3  # two ramp points and the capacity probe at most
        first = sweep["points"][0]
        assert first["num_ok"] == first["num_sent"] and first["errors_by_code"] == {}
        assert first["achieved_components_per_s"] > 0
    assert markdown(doc).startswith("# Throughput")
