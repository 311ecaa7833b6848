"""Every ExpertMesh metric, declared once.

Instruments are Ray metrics (`ray.util.metrics`): each process records into its node's Ray metrics
agent, which serves them on that node's metrics export port (`ray start --metrics-export-port`,
`expertmesh serve --metrics-port`), so every node of a multi-node cluster is scraped the same way.
Ray prefixes the names with `ray_` and adds its own tags (`NodeAddress`, `WorkerId`, `SessionName`,
...); `EXPORTED_PREFIX` is what PromQL sees.

Labels are bounded: every label value comes from the spec (experts, categories, rules), validated
config (factories in the tokens file), or a fixed enum (codes, verdicts, tiers, reasons) - never a raw
request string. `label_or_other()` folds anything else into "other".
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

EXPORTED_PREFIX = "ray_"
OTHER = "other"

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

INGRESSES = ("grpc", "grpc_board", "http")
READINESS = ("ready", "waited_load")


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        return EXPORTED_PREFIX + self.name


METRICS: tuple[MetricDef, ...] = (
    # ingress
    MetricDef("expertmesh_requests_total", "counter",
              "Inspections answered, by factory (unauthenticated when the token failed), CoE (the spec name; none when "
              "refused before one was chosen), ingress (grpc, grpc_board, http) and outcome (gRPC status code name)",
              ("factory", "coe", "ingress", "code")),
    MetricDef("expertmesh_verdicts_total", "counter", "Verdicts returned, by factory, CoE and verdict",
              ("factory", "coe", "verdict")),
    MetricDef("expertmesh_request_latency_seconds", "histogram", "Whole inspection inside the ingress, by ingress",
              ("ingress",), LATENCY_BUCKETS_S),
    # router
    MetricDef("expertmesh_router_decisions_total", "counter", "Router step 1 decisions, by CoE and category",
              ("coe", "category")),
    MetricDef("expertmesh_router_fallbacks_total", "counter",
              "Requests sent to the fallback (router confidence below min_confidence), by CoE and the category it guessed",
              ("coe", "category")),
    MetricDef("expertmesh_gating_rule_hits_total", "counter", "Gating rules that matched a request, by rule", ("rule",)),
    MetricDef("expertmesh_expert_invocations_total", "counter",
              "Expert calls made (the classifier's by the router, the rest by the expert hosts), by expert and reason "
              "(router, table, rule, dependency, fallback)",
              ("expert", "reason")),
    MetricDef("expertmesh_rollout_requests_total", "counter",
              "Requests answered, by the spec revision that answered (coe_version: <spec name>@<spec version>) and "
              "role (stable; canary: the canary's share of its factory)", ("coe_version", "role")),
    MetricDef("expertmesh_canary_comparisons_total", "counter",
              "Canary answers compared with the stable revision's answer to the same image, by canary and stable "
              "revision, the rollout's revision number and outcome (agree: same verdict and defect; disagree; failed: "
              "either ended in an error)", ("canary", "stable", "rollout", "outcome")),
    MetricDef("expertmesh_route_latency_seconds", "histogram", "Router step 1 (classify) and the plan",
              (), LATENCY_BUCKETS_S),
    MetricDef("expertmesh_expert_latency_seconds", "histogram",
              "One batch of an expert on its host (any load, preprocessing, inference), by expert",
              ("expert",), LATENCY_BUCKETS_S),
    MetricDef("expertmesh_expert_queue_depth", "gauge",
              "Expert calls the router has sent to hosts and not had answered, by expert (sum over router replicas)",
              ("expert",)),
    # expert replicas
    MetricDef("expertmesh_expert_requests_total", "counter",
              "Images an expert replica classified, by expert and readiness: ready (weights were on the device) or "
              "waited_load (the request waited for a load); hit rate = ready / all",
              ("expert", "readiness")),
    MetricDef("expertmesh_expert_loads_total", "counter", "Tier moves up (disk->host, host->device), by expert and the tier loaded into",
              ("expert", "tier")),
    MetricDef("expertmesh_expert_unloads_total", "counter", "Tier moves down, by expert and the tier left", ("expert", "tier")),
    MetricDef("expertmesh_expert_switches_total", "counter",
              "Loads a waiting request forced (the expert was switched back onto the device), by expert", ("expert",)),
    MetricDef("expertmesh_expert_evictions_total", "counter",
              "Experts a pooled host moved off its device to make room, by expert and reason (orphaned_downstream, "
              "low_usage, lru, fifo)", ("expert", "reason")),
    MetricDef("expertmesh_expert_prefetches_total", "counter",
              "Downstream experts a pooled host loaded while their upstream ran, by expert and outcome (loaded; hit: "
              "a call found it there)", ("expert", "outcome")),
    MetricDef("expertmesh_host_queue_depth", "gauge", "Expert calls queued in a pooled host, by node and expert",
              ("node", "expert")),
    MetricDef("expertmesh_host_memory_bytes", "gauge",
              "Bytes of expert weights a pooled host holds, by node and tier (device; host: the host-memory copies)",
              ("node", "tier")),
    MetricDef("expertmesh_expert_load_seconds", "histogram", "Duration of one tier move up, by expert and the tier loaded into",
              ("expert", "tier"), LOAD_BUCKETS_S),
    MetricDef("expertmesh_expert_replicas", "gauge",
              "1 per process holding an expert (an expert host replica, or a router replica for the classifier), by "
              "expert and node: sum by (expert) is the replica count, by (expert, node) the current placement",
              ("expert", "node")),
    MetricDef("expertmesh_expert_memory_bytes", "gauge",
              "Bytes an expert replica holds, by expert, node and tier (host or device; on a CPU node the device is "
              "host memory)", ("expert", "node", "tier")),
    MetricDef("expertmesh_node_memory_budget_bytes", "gauge", "Memory a node offers experts, by node and tier",
              ("node", "tier")),
    # placement controller
    MetricDef("expertmesh_replans_total", "counter", "Placements re-planned and applied, by reason "
              "(node_lost, node_joined, node_lost_and_joined: both in one poll, experts_changed: the app serves experts "
              "the placement lacks, drift)", ("reason",)),
    MetricDef("expertmesh_replan_seconds", "histogram", "Time to re-plan and apply a placement", (), LOAD_BUCKETS_S),
    MetricDef("expertmesh_plan_fallbacks_total", "counter", "Batched host calls the router sent to a surviving host "
              "because the host of their experts' node was lost, by the lost node", ("node",)),
    MetricDef("expertmesh_placement_planned_replicas", "gauge", "1 where the current plan puts an expert on a node",
              ("expert", "node")),
)

BY_NAME = {m.name: m for m in METRICS}


def label_or_other(value: str, allowed: Iterable[str]) -> str:
    """`value` if it is one of `allowed`, else "other": label values never come from raw request strings."""
    return value if value in set(allowed) else OTHER


class Instruments:
    """The live instruments of this process (created on first use, in the process that records)."""

    def __init__(self) -> None:
        from ray.util import metrics as rm

        self._by_name = {}
        for m in METRICS:
            if m.kind == "counter":
                inst = rm.Counter(m.name, description=m.description, tag_keys=m.tag_keys)
            elif m.kind == "gauge":
                inst = rm.Gauge(m.name, description=m.description, tag_keys=m.tag_keys)
            else:
                inst = rm.Histogram(m.name, description=m.description, boundaries=list(m.boundaries), tag_keys=m.tag_keys)
            self._by_name[m.name] = inst

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value:
            self._by_name[name].inc(value, tags=tags or None)

    def set(self, name: str, value: float, **tags: str) -> None:
        self._by_name[name].set(value, tags=tags or None)

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._by_name[name].observe(value, tags=tags or None)


@functools.lru_cache(maxsize=1)
def instruments() -> Instruments:
    return Instruments()


def node_name() -> str:
    """This process's node as a metric label: its `expertmesh.io/node` Ray label, else the node id's first 12 hex."""
    import ray

    ctx = ray.get_runtime_context()
    try:
        labels = ctx.get_node_labels() or {}
    except Exception:  # noqa: BLE001 - older Ray or no labels: fall back to the id
        labels = {}
    return labels.get("expertmesh.io/node") or ctx.get_node_id()[:12]


def reference_table() -> str:
    """The metrics reference docs/observability.md quotes, one row per declaration (a test keeps the two equal)."""
    rows = ["| metric (as scraped) | type | labels | meaning |", "|---|---|---|---|"]
    rows += [f"| `{m.exported}` | {m.kind} | {', '.join(m.tag_keys) or '-'} | {m.description} |" for m in METRICS]
    return "\n".join(rows)
