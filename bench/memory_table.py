"""The memory benchmark's arithmetic and table: closed-loop figures, the label check, the headline against the
issue's targets, and the markdown file. Pure: no Ray, no I/O, no clock.

A system's entry in the results document holds `closed` (N stations, each sending its next request when the
previous one was answered: throughput, latency, the stats of that phase), `open` (the open-loop sweep: every point,
the highest rate whose p99 held the bound, the capacity, the stats of the sweep) and `labels` (its answers checked
against the all-resident run's).
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

# the targets
SPEEDUP_OVER_MULTIPLEXED = 4.5
SWITCH_FRACTION_OF_MULTIPLEXED = 0.10
FRACTION_OF_ALL_RESIDENT = 0.80


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


def headline(doc: dict) -> dict:
    """The issue's targets from a results document: (a) against (b) and (d), switches, budgets, answers."""
    s = doc.get("systems", {})
    a, b, d = s.get("expertmesh", {}), s.get("multiplexed", {}), s.get("all_resident", {})
    b2, a2 = s.get("multiplexed_mean_k", {}), s.get("expertmesh_no_host_tier", {})
    rate = ("open", "highest_rate_meeting_target_per_s")
    closed = ("closed", "throughput_per_s")
    switches = ("closed", "stats", "switches")
    out = {
        "open_speedup_over_multiplexed": _ratio(dig(a, *rate), dig(b, *rate)),
        "closed_speedup_over_multiplexed": _ratio(dig(a, *closed), dig(b, *closed)),
        "switch_fraction_of_multiplexed": _ratio(dig(a, *switches), dig(b, *switches)),
        "open_speedup_over_multiplexed_mean_k": _ratio(dig(a, *rate), dig(b2, *rate)),  # (b'): no target, shown
        "closed_speedup_over_multiplexed_mean_k": _ratio(dig(a, *closed), dig(b2, *closed)),
        "switch_fraction_of_multiplexed_mean_k": _ratio(dig(a, *switches), dig(b2, *switches)),
        "no_host_tier_open_speedup_over_multiplexed": _ratio(dig(a2, *rate), dig(b, *rate)),  # no target, shown
        "no_host_tier_closed_speedup_over_multiplexed": _ratio(dig(a2, *closed), dig(b, *closed)),
        "open_fraction_of_all_resident": _ratio(dig(a, *rate), dig(d, *rate)),
        "closed_fraction_of_all_resident": _ratio(dig(a, *closed), dig(d, *closed)),
        "hosts_within_budget": {name: within_budget(dig(sys, "closed", "stats")) is not False
                                and within_budget(dig(sys, "open", "stats")) is not False
                                for name, sys in s.items()
                                if sys.get("kind") == "host" and (dig(sys, "closed", "stats") or dig(sys, "open", "stats"))},
        "label_mismatches": sum(dig(sys, "labels", "num_mismatched") or 0 for sys in s.values()),
    }
    target = {"open_speedup_over_multiplexed": lambda v: v >= SPEEDUP_OVER_MULTIPLEXED,
              "closed_speedup_over_multiplexed": lambda v: v >= SPEEDUP_OVER_MULTIPLEXED,
              "switch_fraction_of_multiplexed": lambda v: v <= SWITCH_FRACTION_OF_MULTIPLEXED,
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


def system_rows(doc: dict, names: Sequence[str]) -> list[list[str]]:
    rows = []
    s = doc.get("systems", {})
    for name in names:
        sys = s.get(name)
        if not sys:
            continue
        c, o = sys.get("closed") or {}, sys.get("open") or {}
        cs = c.get("stats")
        errors = sum((c.get("errors_by_code") or {}).values())
        k = dig(sys, "config", "max_num_models_per_replica")
        rows.append([sys.get("title", name) + (f" [K={k}]" if k is not None else ""), _f(c.get("throughput_per_s"), ".1f"), _f(c.get("p50_ms"), ".0f"),
                     _f(c.get("p99_ms"), ".0f"), _f(o.get("highest_rate_meeting_target_per_s"), ".3g"),
                     _f(o.get("capacity_per_s"), ".3g"), _f(dig(cs, "switches"), "d"),
                     _f(_ratio(dig(cs, "switches"), c.get("num_ok")), ".2f"), _loads(cs), _evictions(cs),
                     _prefetch(cs), _memory(cs), _mib(dig(cs, "peak_host_bytes")),
                     str(errors), _f(dig(sys, "labels", "num_mismatched"), "d")])
    return rows


SYSTEM_HEADER = ["system", "closed req/s", "p50 ms", "p99 ms", "open: highest rate at p99 bound, req/s",
                 "open: capacity, req/s", "switches", "switches/request", "loads disk / host", "evictions",
                 "prefetch hits / loads", "peak device MiB / budget", "peak host MiB", "errors", "label mismatches"]


def points_rows(doc: dict, names: Sequence[str]) -> list[list[str]]:
    rows = []
    for name in names:
        for p in dig(doc, "systems", name, "open", "points") or []:
            rows.append([name, _f(p["offered_per_s"], ".3g"), _f(p["achieved_per_s"], ".3g"), _f(p["p50_ms"], ".0f"),
                         _f(p["p99_ms"], ".0f"),
                         ", ".join(f"{k} {v}" for k, v in p["errors_by_code"].items()) or "none"])
    return rows


def markdown(doc: dict) -> str:
    """The table file: the systems, the ablation, the targets, then every open-loop point."""
    s = doc.get("settings", {})
    m = doc.get("machine", {})
    w = doc.get("workload", {})
    names = doc.get("order") or list(doc.get("systems", {}))
    h = doc.get("headline") or headline(doc)
    bound = s.get("target_p99_ms")
    lines = ["# Memory-limited serving (`expertmesh bench memory`)", "",
             f"Measured {doc.get('date', '?')} on {m.get('cpu_count', '?')} CPUs, commit "
             f"{(doc.get('commit') or '?')[:10]}" + (" (worktree dirty)" if doc.get("worktree_dirty") else "") + ". "
             f"{w.get('num_experts', '?')} experts ({_mib(w.get('total_expert_bytes'))} MiB), device budget "
             f"{_mib(w.get('device_budget_bytes'))} MiB per replica ({s.get('device_budget_fraction', 0):.3g} of all), "
             f"host budget {_mib(w.get('host_budget_bytes')) if w.get('host_budget_bytes') is not None else 'none'} "
             f"MiB; (b)'s K = {w.get('multiplexed_k', '?')} models per replica (rule {w.get('k_rule', '?')}; by rule: "
             f"{', '.join(f'{r} {v}' for r, v in (w.get('k_by_rule') or {}).items())}); "
             f"{s.get('closed_requests', '?')} requests closed-loop from {s.get('num_stations', '?')} stations, "
             f"open-loop p99 bound {_f(bound, 'g')} ms.", "",
             *([f"Note: {doc['note']}", ""] if doc.get("note") else []),
             "## Systems", "", *_table(SYSTEM_HEADER, system_rows(doc, names)), "",
             "Switches, loads, evictions, prefetch hits and peaks are of the closed-loop run (after the warm-up).", "",
             *[f"**{n} failed**: {sys['error']}" for n, sys in doc.get("systems", {}).items() if sys.get("error")],
             "## Ablation", "", *_table(SYSTEM_HEADER, system_rows(doc, [n for n in doc.get("ablation", ())])), "",
             "## Targets", "",
             *_table(["target", "measured", "met"], target_rows(h)),
             "", "## Open-loop points", "",
             *_table(["system", "offered /s", "achieved /s", "p50 ms", "p99 ms", "errors"], points_rows(doc, names))]
    return "\n".join(lines) + "\n"


def _met(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def target_rows(h: dict) -> list[list[str]]:
    """The issue's targets against the headline figures: target, measured, met."""
    return [
                 ["(a) throughput >= 4.5x (b), open loop at the p99 bound", _f(h["open_speedup_over_multiplexed"], ".2f"),
                  _met(h["met"]["open_speedup_over_multiplexed"])],
                 ["(a) throughput >= 4.5x (b), closed loop", _f(h["closed_speedup_over_multiplexed"], ".2f"),
                  _met(h["met"]["closed_speedup_over_multiplexed"])],
                 ["(a) switches <= 10% of (b)'s (closed loop)", _f(h["switch_fraction_of_multiplexed"], ".1%"),
                  _met(h["met"]["switch_fraction_of_multiplexed"])],
                 ["(a) against (b'), open loop / closed loop / switches (no target)",
                  f"{_f(h.get('open_speedup_over_multiplexed_mean_k'), '.2f')} / "
                  f"{_f(h.get('closed_speedup_over_multiplexed_mean_k'), '.2f')} / "
                  f"{_f(h.get('switch_fraction_of_multiplexed_mean_k'), '.1%')}", "-"],
                 ["(a) without the host tier against (b), open loop / closed loop (no target)",
                  f"{_f(h.get('no_host_tier_open_speedup_over_multiplexed'), '.2f')} / "
                  f"{_f(h.get('no_host_tier_closed_speedup_over_multiplexed'), '.2f')}", "-"],
                 ["(a) >= 80% of (d), open loop", _f(h["open_fraction_of_all_resident"], ".1%"),
                  _met(h["met"]["open_fraction_of_all_resident"])],
                 ["(a) >= 80% of (d), closed loop", _f(h["closed_fraction_of_all_resident"], ".1%"),
                  _met(h["met"]["closed_fraction_of_all_resident"])],
                 ["no pooled host over its device or host budget",
                  ", ".join(f"{k} {'ok' if v else 'OVER'}" for k, v in h["hosts_within_budget"].items()) or "-",
                  _met(h["met"]["hosts_within_budget"])],
                 ["every answer equals the all-resident run's", f"{h['label_mismatches']} mismatches",
                  _met(h["met"]["same_answers"])]]


README_COLUMNS = ("system", "closed req/s", "p99 ms", "open: highest rate at p99 bound, req/s", "switches",
                  "loads disk / host", "peak device MiB / budget", "label mismatches")
README_MARKERS = ("<!-- memory-table -->", "<!-- /memory-table -->")


def readme_block(doc: dict) -> str:
    """What the README shows of a run: the systems (a few columns) and the targets, with the commit and command."""
    names = doc.get("order") or list(doc.get("systems", {}))
    idx = [SYSTEM_HEADER.index(c) for c in README_COLUMNS]
    rows = [[r[i] for i in idx] for r in system_rows(doc, names)]
    return (f"Measured at {(doc.get('commit') or '?')[:7]} ({str(doc.get('date', '?'))[:16].replace('T', ' ')} UTC, "
            f"{doc.get('machine', {}).get('cpu_count', '?')} shared CPUs; `{doc.get('command')}`):\n\n"
            + "\n".join(_table(list(README_COLUMNS), rows)) + "\n\n"
            + "\n".join(_table(["target", "measured", "met"], target_rows(doc.get("headline") or headline(doc))))
            + "\n")


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
    update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"),
                  Path(sys.argv[2] if len(sys.argv) > 2 else "bench/results/memory.json"))
    print("README memory table rewritten")
