"""Observed usage from the invocations counter: parsing, counter resets, the sliding window, drift (no Ray)."""

from __future__ import annotations

import pytest

from expertmesh.cluster.observed import METRIC, UsageWatch, counter_increase, observed_profile, parse_invocations
from expertmesh.cluster.replan import ClusterSnapshot, ReplanConfig, ReplanState, decide
from expertmesh.profiler.store import EdgeWeight, UsageProfile


def page(counts: dict[tuple[str, str, str], float]) -> str:
    """A /metrics page as Ray serves it: (expert, reason, replica) -> value."""
    lines = [f"# HELP {METRIC} Expert calls", f"# TYPE {METRIC} counter"]
    lines += [f'{METRIC}{{expert="{e}",reason="{r}",replica="{rep}"}} {v}' for (e, r, rep), v in counts.items()]
    return "\n".join(lines) + "\n"


def test_parse_and_increase_handle_resets_and_new_series():
    before = parse_invocations(page({("clf", "router", "a"): 10, ("chip", "table", "a"): 4}))
    after = parse_invocations(page({("clf", "router", "a"): 3, ("chip", "table", "a"): 9, ("qfp", "table", "b"): 2}))
    inc = counter_increase(before, after)
    values = {dict(k)["expert"]: v for k, v in inc.items()}
    assert values == {"clf": 3, "chip": 5, "qfp": 2}  # clf's replica restarted: counts from zero


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_usage_watch_reports_the_window_and_waits_for_enough_requests():
    clock, pages = Clock(), {"n0": page({}), "n1": page({})}
    watch = UsageWatch(lambda: sorted(pages), {"clf"}, window_s=30, min_requests=50, clock=clock,
                       fetch=lambda t: pages[t])
    assert watch.poll() is None  # the first scrape is the baseline
    totals = {"clf": 0, "chip": 0, "qfp": 0}
    for step in range(1, 11):  # 10 polls, 5 s apart: 20 requests each, chip in 15, qfp in 5
        clock.now_s = 5.0 * step
        totals = {"clf": totals["clf"] + 20, "chip": totals["chip"] + 15, "qfp": totals["qfp"] + 5}
        pages["n0"] = page({("clf", "router", "r0"): totals["clf"] / 2, ("chip", "table", "r1"): totals["chip"]})
        pages["n1"] = page({("clf", "router", "r2"): totals["clf"] / 2, ("qfp", "table", "r3"): totals["qfp"]})
        got = watch.poll()
        if step < 3:
            assert got is None, step  # 40 requests so far: under min_requests
    usage, requests = got
    assert requests == 140  # 7 polls of 20 inside the last 30 s
    assert usage == pytest.approx({"clf": 1.0, "chip": 0.75, "qfp": 0.25})


def test_a_lost_node_is_skipped_not_fatal():
    count = {"n": 0}

    def fetch(target: str) -> str:
        if target == "gone":
            raise ConnectionRefusedError("gone")
        count["n"] += 10
        return page({("clf", "router", "r"): count["n"], ("chip", "table", "r"): count["n"] / 2})
    watch = UsageWatch(lambda: ["n0", "gone"], {"clf"}, min_requests=10, fetch=fetch)
    assert watch.poll() is None
    assert watch.poll() == ({"chip": 0.5, "clf": 1.0}, 10)


def test_observed_drift_triggers_a_replan_after_the_hold_time():
    planned = UsageProfile(source="spec", num_requests=0, usage={"clf": 1.0, "chip": 0.8, "qfp": 0.2},
                           edges=[EdgeWeight(upstream="clf", downstream="chip", kind="route", probability=0.8),
                                  EdgeWeight(upstream="clf", downstream="qfp", kind="route", probability=0.2)])
    observed = {"clf": 1.0, "chip": 0.1, "qfp": 0.9}  # the line switched products
    cfg = ReplanConfig(drift_threshold=0.2, drift_hold_s=10, min_interval_s=0)
    state = ReplanState(planned_nodes=frozenset({"n0"}), planned_usage=planned.usage, last_plan_s=0.0)
    first, state = decide(cfg, state, ClusterSnapshot(100.0, frozenset({"n0"}), observed))
    later, state = decide(cfg, state, ClusterSnapshot(111.0, frozenset({"n0"}), observed))
    assert not first.replan and later.replan and "drift" in later.reason
    profile = observed_profile(planned, observed, 500)
    weights = {(e.upstream, e.downstream): e.probability for e in profile.edges}
    assert weights == pytest.approx({("clf", "chip"): 0.1, ("clf", "qfp"): 0.9})
