"""When to re-plan (pure, injected clock): node loss or join at once; traffic drift only when it lasts.

`decide(config, state, snapshot)` compares the live cluster (alive nodes, observed usage per expert)
with what the current plan was made for, and returns a decision plus the next state. A decision that
re-plans carries its `ReplanKind`: node_lost, node_joined, node_lost_and_joined (both seen in one poll),
memory_changed (a node kept offers experts another amount of memory: a smaller budget degrades the plan - experts
move to host memory or disk - a larger one gives them back the device), experts_changed (the app serves experts the
running placement does not hold: a CoE added, an expert retrained into a new version) or drift. The kind, never the reason text, is what callers branch on: it is the
`expertmesh_replans_total{reason}` label and says which usage to plan with (`uses_observed_usage`: only
a drift re-plan plans with the observed usage; a node change re-plans with the usage the running plan
assumed, so it moves only what the change forces).

Drift is the total-variation distance between the usage the plan assumed and the usage observed; it
must exceed `drift_threshold` for `drift_hold_s` (and `min_interval_s` must have passed since the last
plan) to trigger, and it only clears again below `drift_threshold * clear_ratio`, so a mix hovering at
the threshold does not make the placement flap. The state `decide` returns with a re-plan is the state
once that plan is applied; a caller whose apply fails keeps the state it passed in, so the next poll
decides (and tries) again. The glue that polls the cluster, observes usage and applies new plans is
`cluster.controller`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class ReplanKind(str, Enum):
    """Why a placement is re-planned; the value is the `expertmesh_replans_total{reason}` label."""

    NODE_LOST = "node_lost"
    NODE_JOINED = "node_joined"
    NODE_LOST_AND_JOINED = "node_lost_and_joined"
    MEMORY_CHANGED = "memory_changed"
    EXPERTS_CHANGED = "experts_changed"
    DRIFT = "drift"

    @property
    def uses_observed_usage(self) -> bool:
        """Plan with the observed usage (drift) rather than the usage the running plan assumed (node changes)."""
        return self is ReplanKind.DRIFT


class ReplanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    drift_threshold: float = Field(0.2, gt=0, le=1,
                                   description="total-variation distance of usage that counts as drift")
    clear_ratio: float = Field(0.5, gt=0, lt=1, description="drift clears below threshold x this (hysteresis)")
    drift_hold_s: float = Field(30.0, ge=0, description="drift must last this long")
    min_interval_s: float = Field(60.0, ge=0, description="at least this long between drift re-plans")


@dataclass(frozen=True)
class ClusterSnapshot:
    now_s: float
    nodes: frozenset[str]  # alive nodes
    usage: dict[str, float]  # observed P(expert invoked) per request; empty when too few requests were seen
    unplaced: frozenset[str] = frozenset()  # experts the app serves that the running placement does not hold
    memory: dict[str, int] = field(default_factory=dict)  # alive node -> bytes it offers experts (empty: not read)


@dataclass(frozen=True)
class ReplanState:
    planned_nodes: frozenset[str]
    planned_usage: dict[str, float]  # the usage the running plan was made for
    last_plan_s: float
    drift_since_s: float | None = None
    planned_memory: dict[str, int] = field(default_factory=dict)  # node -> bytes the running plan was made for


@dataclass(frozen=True)
class Decision:
    kind: ReplanKind | None = None  # None: keep the running plan
    reason: str = ""  # for the log only: callers branch on `kind`
    drift: float = 0.0
    lost: frozenset[str] = field(default_factory=frozenset)
    joined: frozenset[str] = field(default_factory=frozenset)

    @property
    def replan(self) -> bool:
        return self.kind is not None


def usage_drift(a: dict[str, float], b: dict[str, float]) -> float:
    """Total-variation distance between two usage vectors, each normalised to sum 1."""
    keys = set(a) | set(b)
    sa, sb = sum(a.values()) or 1.0, sum(b.values()) or 1.0
    return 0.5 * sum(abs(a.get(k, 0.0) / sa - b.get(k, 0.0) / sb) for k in keys)


def node_change_kind(lost: frozenset[str], joined: frozenset[str]) -> ReplanKind | None:
    if lost and joined:
        return ReplanKind.NODE_LOST_AND_JOINED
    if lost:
        return ReplanKind.NODE_LOST
    if joined:
        return ReplanKind.NODE_JOINED
    return None


def memory_changes(state: ReplanState, snap: ClusterSnapshot) -> dict[str, tuple[int, int]]:
    """Nodes planned for and still alive whose memory differs from what the plan was made for: node -> (was, now)."""
    return {n: (state.planned_memory[n], snap.memory[n]) for n in sorted(snap.memory)
            if n in state.planned_memory and n in state.planned_nodes and snap.memory[n] != state.planned_memory[n]}


def decide(cfg: ReplanConfig, state: ReplanState, snap: ClusterSnapshot) -> tuple[Decision, ReplanState]:
    lost, joined = state.planned_nodes - snap.nodes, snap.nodes - state.planned_nodes
    drift = usage_drift(state.planned_usage, snap.usage) if snap.usage else 0.0
    kind = node_change_kind(lost, joined)
    memory = dict(snap.memory) or dict(state.planned_memory)
    if kind is not None:
        parts = ([f"node lost: {', '.join(sorted(lost))}"] if lost else []) + (
            [f"node joined: {', '.join(sorted(joined))}"] if joined else [])
        planned = ReplanState(planned_nodes=snap.nodes, planned_usage=state.planned_usage, last_plan_s=snap.now_s,
                              planned_memory=memory)
        return Decision(kind, "; ".join(parts), drift, lost, joined), planned
    changed = memory_changes(state, snap)
    if changed:
        planned = ReplanState(planned_nodes=snap.nodes, planned_usage=state.planned_usage, last_plan_s=snap.now_s,
                              planned_memory=memory)
        reason = "memory changed: " + ", ".join(f"{n} {a / 2**20:.1f} -> {b / 2**20:.1f} MiB"
                                                for n, (a, b) in changed.items())
        return Decision(ReplanKind.MEMORY_CHANGED, reason, drift), planned
    if snap.unplaced:
        planned = ReplanState(planned_nodes=snap.nodes, planned_usage=state.planned_usage, last_plan_s=snap.now_s,
                              planned_memory=memory)
        return Decision(ReplanKind.EXPERTS_CHANGED, f"experts not placed: {', '.join(sorted(snap.unplaced))}",
                        drift), planned
    if drift >= cfg.drift_threshold:
        since = state.drift_since_s if state.drift_since_s is not None else snap.now_s
        held = snap.now_s - since >= cfg.drift_hold_s
        rested = snap.now_s - state.last_plan_s >= cfg.min_interval_s
        if held and rested:
            planned = ReplanState(planned_nodes=snap.nodes, planned_usage=dict(snap.usage), last_plan_s=snap.now_s,
                                  planned_memory=memory)
            reason = f"traffic drift {drift:.2f} for {snap.now_s - since:.0f} s"
            return Decision(ReplanKind.DRIFT, reason, drift), planned
        return Decision(None, "drift pending", drift), replace(state, drift_since_s=since)
    if drift < cfg.drift_threshold * cfg.clear_ratio:
        return Decision(None, "", drift), replace(state, drift_since_s=None)
    return Decision(None, "", drift), state  # inside the hysteresis band: keep whatever was pending
