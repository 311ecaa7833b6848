"""The memory benchmark's arithmetic and table: closed-loop figures, the label check, the headline against the
issue's targets, and the markdown file. Pure: no Ray, no I/O, no clock.

The results document holds one run per workload (`runs`: components, boards). A system's entry in a run holds
`closed` (N stations, each sending its next request when the previous one was answered: throughput in requests and
components, latency, the stats of that phase), `open` (the open-loop sweep: every point, the highest rate whose p99
held the bound, the capacity, the stats of the sweep), `config` and `labels` (its answers checked against the
all-resident run's). A run's headline compares (a) ExpertMesh as planned with (b*) the best Serve multiplexing found,
(d) every expert resident, and assign with Serve's power of two on the same two executors.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from expertmesh.bench.throughput_sweep import OK, RequestRecord, percentile_ms

Labels = Mapping[str, Mapping[str, str]]  # request id -> expert -> label
MAX_EXAMPLES = 5

# the issue's targets (on the boards workload; the components workload is reported against the same bars)
SPEEDUP_OVER_MULTIPLEXED = 2.0
SWITCH_FRACTION_OF_MULTIPLEXED = 0.50
FRACTION_OF_ALL_RESIDENT = 0.85
TARGET_WORKLOAD = "boards"


def closed_summary(records: Sequence[RequestRecord], num_stations: int) -> dict:
    """A closed-loop run's figures: answered requests over the span from the first send to the last answer."""
    if not records:
        raise ValueError("a closed-loop run without requests has no figures")
    ok = [r for r in records if r.code == OK]
    start = min(r.sent_s for r in records)
    span_s = max(r.sent_s + r.latency_ms / 1000.0 for r in records) - start
    latencies = [r.latency_ms for r in ok]
    return {"num_stations": num_stations, "num_sent": len(records), "num_ok": len(ok), "duration_s": span_s,
            "throughput_per_s": len(ok) / span_s if span_s > 0 else None,
            "num_components": sum(r.num_components for r in ok),
            "components_per_s": sum(r.num_components for r in ok) / span_s if span_s > 0 else None,
            "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            "errors_by_code": dict(sorted(Counter(r.code for r in records if r.code != OK).items()))}


def label_check(reference: Labels, answers: Labels) -> dict:
    """Every request both runs answered must have the same label from every expert (and the same experts run)."""
    common = sorted(set(reference) & set(answers))
    bad = [rid for rid in common if dict(reference[rid]) != dict(answers[rid])]
    return {"num_compared": len(common), "num_mismatched": len(bad),
            "examples": [{"request_id": rid, "reference": dict(reference[rid]), "got": dict(answers[rid])}
                         for rid in bad[:MAX_EXAMPLES]]}


def within_budget(stats: Mapping | None) -> bool | None:
    """Whether the peaks stayed within the budgets (None when the stats say nothing; a lifted budget holds)."""
    if not stats or stats.get("peak_device_bytes") is None:
        return None
    if stats.get("per_replica"):  # several replicas: each within its own budgets
        return all(within_budget(r) is not False for r in stats["per_replica"])
    checks = [(stats.get("peak_device_bytes"), stats.get("device_budget_bytes")),
              (stats.get("peak_host_bytes"), stats.get("host_budget_bytes"))]
    return all(budget is None or peak is None or peak <= budget for peak, budget in checks)


def dig(doc, *path):
    """doc[path[0]][path[1]]..., or None where a key is missing or None (results of a partial run)."""
    for key in path:
        if not isinstance(doc, Mapping) or doc.get(key) is None:
            return None
        doc = doc[key]
    return doc


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def headline(run: dict) -> dict:
    """The issue's targets from one run (a workload's systems): (a) against (b*), (d), the earlier (b); assign."""
    s = run.get("systems", {})
    a, best, b, d = (s.get(n, {}) for n in ("expertmesh", "multiplexed_best", "multiplexed", "all_resident"))
    two_assign, two_pow2 = s.get("expertmesh_2x_assign", {}), s.get("expertmesh_2x_pow2", {})
    rate = ("open", "highest_rate_meeting_target_per_s")
    closed = ("closed", "throughput_per_s")
    switches = ("closed", "stats", "switches")
    out = {
        "open_speedup_over_best_multiplexed": _ratio(dig(a, *rate), dig(best, *rate)),
        "closed_speedup_over_best_multiplexed": _ratio(dig(a, *closed), dig(best, *closed)),
        "switch_fraction_of_best_multiplexed": _ratio(dig(a, *switches), dig(best, *switches)),
        "open_fraction_of_all_resident": _ratio(dig(a, *rate), dig(d, *rate)),
        "closed_fraction_of_all_resident": _ratio(dig(a, *closed), dig(d, *closed)),
        "open_speedup_over_earlier_multiplexed": _ratio(dig(a, *rate), dig(b, *rate)),  # no target, shown
        "closed_speedup_over_earlier_multiplexed": _ratio(dig(a, *closed), dig(b, *closed)),
        "assign_over_pow2_closed": _ratio(dig(two_assign, *closed), dig(two_pow2, *closed)),
        "assign_over_pow2_open": _ratio(dig(two_assign, *rate), dig(two_pow2, *rate)),
        "assign_switch_fraction_of_pow2": _ratio(dig(two_assign, *switches), dig(two_pow2, *switches)),
        "best_multiplexed": dig(best, "config", "label"),
        "hosts_within_budget": {name: within_budget(dig(sys, "closed", "stats")) is not False
                                and within_budget(dig(sys, "open", "stats")) is not False
                                for name, sys in s.items()
                                if sys.get("kind") == "host" and (dig(sys, "closed", "stats") or dig(sys, "open", "stats"))},
        "label_mismatches": sum(dig(sys, "labels", "num_mismatched") or 0 for sys in s.values()),
    }
    target = {"open_speedup_over_best_multiplexed": lambda v: v >= SPEEDUP_OVER_MULTIPLEXED,
              "closed_speedup_over_best_multiplexed": lambda v: v >= SPEEDUP_OVER_MULTIPLEXED,
              "switch_fraction_of_best_multiplexed": lambda v: v <= SWITCH_FRACTION_OF_MULTIPLEXED,
              "open_fraction_of_all_resident": lambda v: v >= FRACTION_OF_ALL_RESIDENT,
              "closed_fraction_of_all_resident": lambda v: v >= FRACTION_OF_ALL_RESIDENT}
    out["met"] = {k: (None if out[k] is None else bool(check(out[k]))) for k, check in target.items()}
    out["met"]["hosts_within_budget"] = all(out["hosts_within_budget"].values()) if out["hosts_within_budget"] else None
    out["met"]["same_answers"] = out["label_mismatches"] == 0
    return out


# ------------------------------------------------------------------ markdown
def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:,.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _loads(stats: Mapping | None) -> str:
    tiers = dig(stats, "loads_by_tier") or {}
    return " / ".join(f"{tiers.get(t, 0)}" for t in ("disk", "host")) if stats else "-"


def _evictions(stats: Mapping | None) -> str:
    by = dig(stats, "evictions_by_reason") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(by.items()) if v) or ("0" if stats else "-")


def _prefetch(stats: Mapping | None) -> str:
    if not stats:
        return "-"
    hits, loads = stats.get("prefetch_hits"), stats.get("prefetch_loads")
    return _f(hits, "d") + (f" / {loads}" if loads is not None else "")


def _memory(stats: Mapping | None) -> str:
    if not stats:
        return "-"
    budget = stats.get("device_budget_bytes")
    mean = stats.get("mean_device_bytes")
    return (f"{_mib(stats.get('peak_device_bytes'))} / {_mib(budget) if budget is not None else 'none'}"
            + (f" (mean {_mib(mean)})" if mean is not None else ""))


def _config(sys: Mapping) -> str:
    c = sys.get("config") or {}
    if sys.get("kind") == "multiplexed":
        return c.get("label", "")
    if c.get("num_replicas", 1) > 1 or c.get("warm"):
        return f"{c.get('num_replicas', 1)} executor(s)"
    return ""


def system_rows(run: dict, names: Sequence[str]) -> list[list[str]]:
    rows = []
    s = run.get("systems", {})
    for name in names:
        sys = s.get(name)
        if not sys:
            continue
        c, o = sys.get("closed") or {}, sys.get("open") or {}
        cs = c.get("stats")
        errors = sum((c.get("errors_by_code") or {}).values())
        config = _config(sys)
        rows.append([sys.get("title", name) + (f" [{config}]" if config else ""), _f(c.get("throughput_per_s"), ".2f"),
                     _f(c.get("components_per_s"), ".1f"), _f(c.get("p50_ms"), ".0f"), _f(c.get("p99_ms"), ".0f"),
                     _f(o.get("highest_rate_meeting_target_per_s"), ".3g"), _f(o.get("capacity_per_s"), ".3g"),
                     _f(dig(cs, "switches"), "d"), _f(_ratio(dig(cs, "switches"), c.get("num_components")), ".3f"),
                     _loads(cs), _evictions(cs), _prefetch(cs), _memory(cs), _mib(dig(cs, "peak_host_bytes")),
                     str(errors), _f(dig(sys, "labels", "num_mismatched"), "d")])
    return rows


SYSTEM_HEADER = ["system", "closed req/s", "closed components/s", "p50 ms", "p99 ms",
                 "open: highest rate at p99 bound, req/s", "open: capacity, req/s", "switches", "switches/component",
                 "loads disk / host", "evictions", "prefetch hits / loads", "peak device MiB / budget", "peak host MiB",
                 "errors", "label mismatches"]


def points_rows(run: dict, names: Sequence[str]) -> list[list[str]]:
    rows = []
    for name in names:
        for p in dig(run, "systems", name, "open", "points") or []:
            rows.append([name, _f(p["offered_per_s"], ".3g"), _f(p["achieved_per_s"], ".3g"), _f(p["p50_ms"], ".0f"),
                         _f(p["p99_ms"], ".0f"),
                         ", ".join(f"{k} {v}" for k, v in p["errors_by_code"].items()) or "none"])
    return rows


def search_rows(run: dict) -> list[list[str]]:
    return [[f["config"]["label"], _f(f.get("throughput_per_s"), ".2f"), _f(f.get("switches"), "d"),
             f.get("error", "")] for f in run.get("search") or []]


def _run_markdown(name: str, run: dict) -> list[str]:
    names = run.get("order") or list(run.get("systems", {}))
    h = run.get("headline") or headline(run)
    st = run.get("stream", {})
    plan = dig(run, "plan", "0") or {}
    return [f"## Workload: {name}", "",
            f"{st.get('closed', '?')} requests closed-loop from {st.get('num_stations', '?')} stations after "
            f"{st.get('warmup', '?')} warm-up; open-loop p99 bound {_f(st.get('target_p99_ms'), 'g')} ms. The memory "
            f"model planned {plan.get('num_replicas', '?')} executor(s) with "
            f"{len(plan.get('resident', []))} experts on the device, {len(plan.get('host', []))} in host memory, "
            f"{len(plan.get('on_demand', []))} on demand, and arrange waiting at most {plan.get('max_wait_s', '?')} s "
            "(every pooled host of this workload waits as long).", "",
            *_table(SYSTEM_HEADER, system_rows(run, names)), "",
            *[f"**{n} failed**: {sys['error']}" for n, sys in run.get("systems", {}).items() if sys.get("error")],
            "### Serve multiplexing configurations tried (short closed loop)", "",
            *_table(["configuration", "req/s", "switches", "error"], search_rows(run)), "",
            "### Ablation", "", *_table(SYSTEM_HEADER, system_rows(run, run.get("ablation", ()))), "",
            "### Targets", "", *_table(["target", "measured", "met"], target_rows(h)), "",
            "### Open-loop points", "",
            *_table(["system", "offered /s", "achieved /s", "p50 ms", "p99 ms", "errors"], points_rows(run, names)), ""]


def markdown(doc: dict) -> str:
    """The table file: per workload the systems, the multiplexing search, the ablation, the targets, every point."""
    s = doc.get("settings", {})
    m = doc.get("machine", {})
    w = doc.get("workload", {})
    lines = ["# Memory-limited serving (`expertmesh bench memory`)", "",
             f"Measured {doc.get('date', '?')} on {m.get('cpu_count', '?')} CPUs (systems pinned to "
             f"{dig(doc, 'pinned', 'system_cores') or 'all'}), commit {(doc.get('commit') or '?')[:10]}"
             + (" (worktree dirty)" if doc.get("worktree_dirty") else "") + ". "
             f"{w.get('num_experts', '?')} experts ({_mib(w.get('total_expert_bytes'))} MiB of weights); every system "
             f"gets {_mib(w.get('device_budget_bytes'))} MiB of weights on the device "
             f"({s.get('device_budget_fraction', 0):.3g} of all) and "
             f"{_mib(w.get('host_budget_bytes')) if w.get('host_budget_bytes') is not None else 'unlimited'} MiB of "
             "host copies.", "",
             *([f"Note: {doc['note']}", ""] if doc.get("note") else [])]
    for name, run in (doc.get("runs") or {}).items():
        lines += _run_markdown(name, run)
    return "\n".join(lines) + "\n"


def _met(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def target_rows(h: dict) -> list[list[str]]:
    """The issue's targets against the headline figures: target, measured, met."""
    return [
        ["(a) throughput >= 2x (b*), open loop at the p99 bound", _f(h["open_speedup_over_best_multiplexed"], ".2f"),
         _met(h["met"]["open_speedup_over_best_multiplexed"])],
        ["(a) throughput >= 2x (b*), closed loop", _f(h["closed_speedup_over_best_multiplexed"], ".2f"),
         _met(h["met"]["closed_speedup_over_best_multiplexed"])],
        ["(a) switches <= 50% of (b*)'s (closed loop)", _f(h["switch_fraction_of_best_multiplexed"], ".1%"),
         _met(h["met"]["switch_fraction_of_best_multiplexed"])],
        ["(a) >= 85% of (d), open loop", _f(h["open_fraction_of_all_resident"], ".1%"),
         _met(h["met"]["open_fraction_of_all_resident"])],
        ["(a) >= 85% of (d), closed loop", _f(h["closed_fraction_of_all_resident"], ".1%"),
         _met(h["met"]["closed_fraction_of_all_resident"])],
        ["(a) against the earlier baseline (b), open loop / closed loop (no target)",
         f"{_f(h.get('open_speedup_over_earlier_multiplexed'), '.2f')} / "
         f"{_f(h.get('closed_speedup_over_earlier_multiplexed'), '.2f')}", "-"],
        ["assign against Serve's power of two on the same 2 executors: closed / open / switches (no target)",
         f"{_f(h.get('assign_over_pow2_closed'), '.2f')} / {_f(h.get('assign_over_pow2_open'), '.2f')} / "
         f"{_f(h.get('assign_switch_fraction_of_pow2'), '.1%')}", "-"],
        ["no pooled host over its device or host budget",
         ", ".join(f"{k} {'ok' if v else 'OVER'}" for k, v in h["hosts_within_budget"].items()) or "-",
         _met(h["met"]["hosts_within_budget"])],
        ["every answer equals the all-resident run's", f"{h['label_mismatches']} mismatches",
         _met(h["met"]["same_answers"])]]


README_COLUMNS = ("system", "closed req/s", "closed components/s", "p99 ms", "open: highest rate at p99 bound, req/s",
                  "switches", "loads disk / host", "label mismatches")
README_MARKERS = ("<!-- memory-table -->", "<!-- /memory-table -->")


def readme_block(doc: dict) -> str:
    """What the README shows of a run: per workload the systems (a few columns) and the targets, with the commit and
    command."""
    idx = [SYSTEM_HEADER.index(c) for c in README_COLUMNS]
    out = [f"Measured at {(doc.get('commit') or '?')[:7]} ({str(doc.get('date', '?'))[:16].replace('T', ' ')} UTC, "
           f"{doc.get('machine', {}).get('cpu_count', '?')} CPUs, the systems pinned to "
           f"{dig(doc, 'pinned', 'system_cores') or 'all'}; `{doc.get('command')}`):", ""]
    for name, run in (doc.get("runs") or {}).items():
        names = run.get("order") or list(run.get("systems", {}))
        rows = [[r[i] for i in idx] for r in system_rows(run, names)]
        st = run.get("stream", {})
        out += [f"**{name}** ({st.get('num_stations', '?')} stations, p99 bound {_f(st.get('target_p99_ms'), 'g')} "
                "ms):", "", *_table(list(README_COLUMNS), rows), "",
                *_table(["target", "measured", "met"], target_rows(run.get("headline") or headline(run))), ""]
    return "\n".join(out)


def update_readme(readme_path: Path, results_path: Path) -> None:
    """Rewrite the README's memory-table block from a results JSON (`python -m expertmesh.bench.memory_table`)."""
    text = readme_path.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise ValueError(f"{readme_path} has no {start} ... {end} block; add the two markers where the table goes")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    block = readme_block(json.loads(results_path.read_text()))
    readme_path.write_text(f"{head}{start}\n{block}{end}{tail}")


if __name__ == "__main__":
    update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/memory-limited-serving.md"),
                  Path(sys.argv[2] if len(sys.argv) > 2 else "bench/results/memory.json"))
    print("README memory table rewritten")
