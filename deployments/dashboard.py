"""The Grafana dashboard shipped with ExpertMesh, built from the metric declarations.

`build_dashboard()` returns the dashboard JSON (Grafana schema 39); `expertmesh dashboard --out FILE`
writes it, and `deployments/grafana/expertmesh-dashboard.json` is that output, checked by a test to be
current. Every query is PromQL over the names in `expertmesh.metrics` (as exported, `ray_` prefixed),
filtered by the `factory` and `expert` variables; the Prometheus test evaluates each one.
"""

from __future__ import annotations

import json
from pathlib import Path

from expertmesh.metrics import BY_NAME

SHIPPED_PATH = Path(__file__).parent / "grafana" / "expertmesh-dashboard.json"
UID = "expertmesh-overview"
RATE = "$__rate_interval"


def m(name: str) -> str:
    """Exported name of a declared metric (fails on an undeclared one)."""
    return BY_NAME[name].exported


def _q(p: str) -> str:  # the common filters
    return p.replace("{E}", 'expert=~"$expert"').replace("{F}", 'factory=~"$factory",coe=~"$coe"')


def _quantile(q: float, hist: str, by: str, sel: str = "") -> str:
    by_le = ", ".join(["le"] + ([by] if by else []))
    return f"histogram_quantile({q}, sum by ({by_le}) (rate({m(hist)}_bucket{sel}[{RATE}])))"


def hit_rate(over: str, extra_filter: str = "") -> str:
    """ready / all per expert; `over` wraps the series selector `{s}` (e.g. a rate). An expert with no ready
    call yet shows 0, not nothing (`or ... * 0`)."""
    name = m("expertmesh_expert_requests_total")
    f = f",{extra_filter}" if extra_filter else ""
    ready = over.replace("{s}", f'{name}{{readiness="ready"{f}}}')
    every = over.replace("{s}", f"{name}{{{extra_filter}}}" if extra_filter else name)
    return f"(sum by (expert) ({ready}) or sum by (expert) ({every}) * 0) / sum by (expert) ({every})"


HIT_RATE_SINCE_START = hit_rate("{s}")

# (title, panel type, unit, [(legend, expr)], width, extra options)
PANELS: list[tuple[str, str, str, list[tuple[str, str]], int, dict]] = [
    ("Expert hit rate (ready / all invocations)", "timeseries", "percentunit", [
        ("{{expert}}", _q(hit_rate(f"rate({{s}}[{RATE}])", "{E}"))),
    ], 12, {"min": 0, "max": 1}),
    ("Hit rate since start", "bargauge", "percentunit", [
        ("{{expert}}", _q(hit_rate("{s}", "{E}"))),
    ], 12, {"min": 0, "max": 1}),
    ("Category mix", "piechart", "short", [
        ("{{coe}} {{category}}", f'sum by (coe, category) (increase({m("expertmesh_router_decisions_total")}{{coe=~"$coe"}}[$__range]))'),
    ], 8, {}),
    ("Invocations per expert (per second, by reason)", "timeseries", "reqps", [
        ("{{expert}} {{reason}}", _q(f'sum by (expert, reason) (rate({m("expertmesh_expert_invocations_total")}{{{{E}}}}[{RATE}]))')),
    ], 16, {}),
    ("Loads, unloads and switches per second", "timeseries", "ops", [
        ("load {{expert}} -> {{tier}}", _q(f'sum by (expert, tier) (rate({m("expertmesh_expert_loads_total")}{{{{E}}}}[{RATE}]))')),
        ("unload {{expert}} from {{tier}}", _q(f'sum by (expert, tier) (rate({m("expertmesh_expert_unloads_total")}{{{{E}}}}[{RATE}]))')),
        ("switch {{expert}}", _q(f'sum by (expert) (rate({m("expertmesh_expert_switches_total")}{{{{E}}}}[{RATE}]))')),
    ], 12, {}),
    ("Load latency p99", "timeseries", "s", [
        ("{{expert}} -> {{tier}}", _quantile(0.99, "expertmesh_expert_load_seconds", "expert, tier", _q("{{E}}"))),
    ], 12, {}),
    ("Requests per second by ingress and outcome", "timeseries", "reqps", [
        ("{{ingress}} {{code}}", _q(f'sum by (ingress, code) (rate({m("expertmesh_requests_total")}{{{{F}}}}[{RATE}]))')),
    ], 12, {}),
    ("Latency p50 / p99 by stage", "timeseries", "s", [
        ("total p50", _quantile(0.5, "expertmesh_request_latency_seconds", "")),
        ("total p99", _quantile(0.99, "expertmesh_request_latency_seconds", "")),
        ("route p50", _quantile(0.5, "expertmesh_route_latency_seconds", "")),
        ("route p99", _quantile(0.99, "expertmesh_route_latency_seconds", "")),
        ("{{expert}} p50", _quantile(0.5, "expertmesh_expert_latency_seconds", "expert", _q("{{E}}"))),
        ("{{expert}} p99", _quantile(0.99, "expertmesh_expert_latency_seconds", "expert", _q("{{E}}"))),
    ], 12, {}),
    ("Verdicts by factory and CoE", "timeseries", "reqps", [
        ("{{factory}} {{coe}} {{verdict}}", _q(f'sum by (factory, coe, verdict) (rate({m("expertmesh_verdicts_total")}{{{{F}}}}[{RATE}]))')),
    ], 12, {}),
    ("Errors by factory", "timeseries", "reqps", [
        ("{{factory}} {{code}}", _q(f'sum by (factory, code) (rate({m("expertmesh_requests_total")}{{code!="OK",{{F}}}}[{RATE}]))')),
    ], 12, {}),
    ("Router fallbacks and gating-rule hits per second", "timeseries", "reqps", [
        ("fallback {{coe}} ({{category}} guessed)", f'sum by (coe, category) (rate({m("expertmesh_router_fallbacks_total")}[{RATE}]))'),
        ("rule {{rule}}", f'sum by (rule) (rate({m("expertmesh_gating_rule_hits_total")}[{RATE}]))'),
    ], 12, {}),
    ("Queue depth and replicas per expert", "timeseries", "short", [
        ("queued {{expert}}", _q(f'sum by (expert) ({m("expertmesh_expert_queue_depth")}{{{{E}}}})')),
        ("replicas {{expert}}", _q(f'sum by (expert) ({m("expertmesh_expert_replicas")}{{{{E}}}})')),
    ], 12, {}),
    ("Memory per node and tier (used, budget)", "timeseries", "bytes", [
        ("used {{node}} {{tier}}", f'sum by (node, tier) ({m("expertmesh_expert_memory_bytes")})'),
        ("budget {{node}} {{tier}}", f'max by (node, tier) ({m("expertmesh_node_memory_budget_bytes")})'),
    ], 12, {}),
    # memory pressure: pooled hosts under their budgets
    ("Memory pressure: pool bytes per node and tier against the budget", "timeseries", "bytes", [
        ("held {{node}} {{tier}}", f'sum by (node, tier) ({m("expertmesh_host_memory_bytes")})'),
        ("budget {{node}} {{tier}}", f'max by (node, tier) ({m("expertmesh_node_memory_budget_bytes")})'),
    ], 8, {}),
    ("Memory pressure: evictions and switches per second", "timeseries", "ops", [
        ("evict ({{reason}})", f'sum by (reason) (rate({m("expertmesh_expert_evictions_total")}[{RATE}]))'),
        ("switch", f'sum(rate({m("expertmesh_expert_switches_total")}[{RATE}]))'),
        ("prefetch ({{outcome}})", f'sum by (outcome) (rate({m("expertmesh_expert_prefetches_total")}[{RATE}]))'),
    ], 8, {}),
    ("Memory pressure: calls queued in hosts per expert", "timeseries", "short", [
        ("{{node}} {{expert}}", _q(f'sum by (node, expert) ({m("expertmesh_host_queue_depth")}{{{{E}}}})')),
    ], 8, {}),
    # live changes (expertmesh rollout)
    ("Requests by CoE revision (stable, canary)", "timeseries", "reqps", [
        ("{{coe_version}} {{role}}", f'sum by (coe_version, role) (rate({m("expertmesh_rollout_requests_total")}[{RATE}]))'),
    ], 12, {}),
    ("Canary agreement with the stable revision", "timeseries", "percentunit", [
        ("{{canary}} vs {{stable}}", f'sum by (canary, stable) (rate({m("expertmesh_canary_comparisons_total")}{{outcome="agree"}}[{RATE}])) / sum by (canary, stable) (rate({m("expertmesh_canary_comparisons_total")}[{RATE}]))'),
    ], 12, {"min": 0, "max": 1}),
    ("Placement (replicas per expert and node)", "table", "short", [
        ("", _q(f'sum by (expert, node) ({m("expertmesh_expert_replicas")}{{{{E}}}}) > 0')),
    ], 12, {"instant": True}),
]

VARIABLES = [  # (name, label, query)
    ("factory", "Factory", f'label_values({m("expertmesh_requests_total")}, factory)'),
    ("coe", "CoE", f'label_values({m("expertmesh_requests_total")}, coe)'),
    ("expert", "Expert", f'label_values({m("expertmesh_expert_invocations_total")}, expert)'),
]


def _panel(i: int, x: int, y: int, title: str, kind: str, unit: str, targets: list[tuple[str, str]], width: int,
           extra: dict) -> dict:
    defaults: dict = {"unit": unit}
    defaults.update({k: v for k, v in extra.items() if k in ("min", "max")})
    panel = {
        "id": i + 1, "title": title, "type": kind, "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                     "instant": bool(extra.get("instant")), "range": not extra.get("instant"),
                     "format": "table" if kind == "table" else "time_series"}
                    for j, (legend, expr) in enumerate(targets)],
        "options": {},
    }
    if kind == "table":
        panel["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    return panel


def build_dashboard() -> dict:
    panels, x, y = [], 0, 0
    for i, (title, kind, unit, targets, width, extra) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(_panel(i, x, y, title, kind, unit, targets, width, extra))
        x += width
    templating = [{"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                   "current": {}, "hide": 0}]
    for name, label, query in VARIABLES:
        templating.append({
            "name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": f"{name}-values"}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
            "sort": 1, "hide": 0,
        })
    return {
        "uid": UID, "title": "ExpertMesh: experts, routing and serving", "tags": ["expertmesh", "ray-serve"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s", "timezone": "",
        "time": {"from": "now-30m", "to": "now"}, "templating": {"list": templating}, "panels": panels,
        "annotations": {"list": []},
        "description": "Which experts are hit and how often, how often they had to be loaded first, the category mix, "
                       "latency per stage, verdicts and errors per factory, memory and placement per node.",
    }


def dashboard_json() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=False) + "\n"


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title or variable name, PromQL) for every query in a dashboard JSON."""
    out = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"${v['name']}", q))
    return out
