"""The throughput benchmark's summaries and markdown table, from its results documents. Pure: no Ray, no I/O.

`sweep_summary` turns a sweep's points into what the table quotes (capacity, the highest rate holding the target);
`headline_rows` gives one row per figure with a column per run (this one, and the design before where given);
`markdown` writes the whole table file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from expertmesh.bench.throughput_sweep import PointResult, SweepRule, capacity, highest_rate_meeting, point_at

Row = tuple[str, list[str]]


def sweep_summary(points: Sequence[PointResult], rule: SweepRule, components_per_request: int) -> dict:
    """A sweep as the results document keeps it: every point, its capacity, the highest rate holding the target."""
    cap = capacity(points)
    best = highest_rate_meeting(points, rule)
    at_best = point_at(points, best)
    return {"target_p99_ms": rule.target_p99_ms, "start_per_s": rule.start_per_s,
            "components_per_request": components_per_request,
            "capacity_per_s": cap.achieved_per_s if cap else None,
            "capacity_components_per_s": cap.achieved_components_per_s if cap else None,
            "highest_rate_meeting_target_per_s": best,
            "highest_rate_meeting_target_components_per_s": best * components_per_request if best else None,
            "at_highest_rate": at_best.to_dict() if at_best else None,
            "points": [p.to_dict() for p in points]}


def _get(doc: dict, *path: str):
    for key in path:
        if not isinstance(doc, dict) or doc.get(key) is None:
            return None
        doc = doc[key]
    return doc


def _num(fmt: str) -> Callable[[object], str]:
    return lambda v: "-" if v is None else format(v, fmt)


def _pct(part, whole) -> str:
    return "-" if part is None or not whole else f"{100.0 * part / whole:.0f}%"


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f} MiB"


def headline_rows(docs: Sequence[dict]) -> list[Row]:
    """One row per headline figure, one column per results document."""
    f1, f2, f0 = _num(".1f"), _num(".2f"), _num(".0f")

    def row(label: str, cell: Callable[[dict], str]) -> Row:
        return label, [cell(d) for d in docs]

    def overload(kind: str) -> list[Row]:
        o = ("overload", kind)
        return [
            row(f"{kind}: overload offered (x capacity), /s",
                lambda d: f"{f1(_get(d, *o, 'offered_per_s'))}" if _get(d, *o) else "-"),
            row(f"{kind}: overload throughput, share of capacity", lambda d: _pct(_get(d, *o, 'fraction_of_capacity'), 1)),
            row(f"{kind}: overload refused (RESOURCE_EXHAUSTED) / sent",
                lambda d: f"{_get(d, *o, 'num_refused')} / {_get(d, *o, 'num_sent')}" if _get(d, *o) else "-"),
            row(f"{kind}: overload p99 time to refusal, ms", lambda d: f0(_get(d, *o, "refusal_p99_ms"))),
            row(f"{kind}: overload DEADLINE_EXCEEDED / other errors",
                lambda d: f"{_get(d, *o, 'num_deadline_exceeded')} / {_get(d, *o, 'num_other_errors')}"
                if _get(d, *o) else "-"),
        ]

    def rss_beyond_weights(d: dict) -> str:
        rss, w = _get(d, "memory", "after_load", "rss_bytes"), _get(d, "memory", "weights_bytes")
        return "-" if rss is None or w is None else _mib(rss - w)

    return [
        row("commit", lambda d: (d.get("commit") or "?")[:10]),
        row("offline bound (one process, batched), components/s", lambda d: f1(_get(d, "offline", "components_per_s"))),
        row("no-op Serve gRPC app: capacity, requests/s", lambda d: f1(_get(d, "noop", "capacity_per_s"))),
        row("no-op: highest rate with p99 <= 250 ms, requests/s",
            lambda d: f1(_get(d, "noop", "highest_rate_meeting_target_per_s"))),
        row("single Inspect: capacity, components/s", lambda d: f1(_get(d, "single", "capacity_per_s"))),
        row("single: highest rate with p99 <= 250 ms, requests/s",
            lambda d: f1(_get(d, "single", "highest_rate_meeting_target_per_s"))),
        row("single: that rate as a share of the no-op's",
            lambda d: _pct(_get(d, "single", "highest_rate_meeting_target_per_s"),
                           _get(d, "noop", "highest_rate_meeting_target_per_s"))),
        row("boards of 50: capacity, components/s", lambda d: f1(_get(d, "board", "capacity_components_per_s"))),
        row("boards: highest rate with board p99 <= 1 s, boards/s",
            lambda d: f2(_get(d, "board", "highest_rate_meeting_target_per_s"))),
        row("boards: that rate in components/s (share of offline bound)",
            lambda d: "-" if _get(d, "board", "highest_rate_meeting_target_components_per_s") is None else
            f"{f1(_get(d, 'board', 'highest_rate_meeting_target_components_per_s'))} "
            f"({_pct(_get(d, 'board', 'highest_rate_meeting_target_components_per_s'), _get(d, 'offline', 'components_per_s'))})"),
        *overload("single"), *overload("board"),
        row("Ray start, s", lambda d: f1(_get(d, "startup", "ray_start_s"))),
        row("ExpertMesh deploy to first answer, s", lambda d: f1(_get(d, "startup", "ready_s"))),
        row("ExpertMesh replica processes (after load)", lambda d: f0(_get(d, "memory", "after_load", "num_processes"))),
        row("ExpertMesh replicas' RSS at ready", lambda d: _mib(_get(d, "memory", "at_ready", "rss_bytes"))),
        row("ExpertMesh replicas' RSS after load", lambda d: _mib(_get(d, "memory", "after_load", "rss_bytes"))),
        row("experts' weights (checkpoint bytes)", lambda d: _mib(_get(d, "memory", "weights_bytes"))),
        row("RSS after load beyond the weights", rss_beyond_weights),
    ]


def _table(header: list[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def points_table(points: Sequence[dict], components_per_request: int) -> list[str]:
    def f(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)
    header = ["offered /s", "sent /s", "achieved /s", "components/s", "p50 ms", "p99 ms", "errors"]
    if components_per_request == 1:
        header.remove("components/s")
    rows = []
    for p in points:
        r = [f(p["offered_per_s"], ".3g"), f(p["sent_per_s"], ".3g"), f(p["achieved_per_s"], ".3g"),
             f(p["achieved_components_per_s"], ".1f"), f(p["p50_ms"], ".0f"), f(p["p99_ms"], ".0f"),
             ", ".join(f"{k} {v}" for k, v in p["errors_by_code"].items()) or "none"]
        if components_per_request == 1:
            del r[3]
        rows.append(r)
    return _table(header, rows)


SWEEPS = (("noop", "No-op Serve gRPC app, single requests"), ("single", "ExpertMesh, single-component Inspect"),
          ("board", "ExpertMesh, boards of 50 components (InspectBoard; latency of the whole stream)"))


def markdown(doc: dict, before: dict | None = None) -> str:
    """The table file: headline figures (beside the design before, where given), then every sweep point."""
    docs = [doc] + ([before] if before else [])
    names = ["this run"] + (["before"] if before else [])
    m = doc.get("machine", {})
    lines = [f"# Throughput (`expertmesh bench throughput`)", "",
             f"Measured {doc.get('date', '?')} on {m.get('cpu_count', '?')} CPUs (load average "
             f"{', '.join(f'{x:.2f}' for x in m.get('load_average_1_5_15m', []))} at the start"
             + (f", {', '.join(f'{x:.2f}' for x in m['load_average_1_5_15m_at_end'])} at the end"
                if m.get("load_average_1_5_15m_at_end") else "") + "), commit "
             f"{(doc.get('commit') or '?')[:10]}" + (" (worktree dirty)" if doc.get("worktree_dirty") else "")
             + (f"; `before` is {(before.get('commit') or '?')[:10]}, measured {before.get('date', '?')}, not re-run."
                if before else "."), "",
             *([f"Note: {doc['note']}", ""] if doc.get("note") else []),
             *_table(["figure", *names], [[label, *cells] for label, cells in headline_rows(docs)])]
    for name, d in zip(names, docs):
        for key, title in SWEEPS:
            sweep = d.get(key)
            if sweep:
                lines += ["", f"## {title} ({name}; target p99 {sweep['target_p99_ms']:g} ms)", "",
                          *points_table(sweep["points"], sweep["components_per_request"])]
    return "\n".join(lines) + "\n"
