"""When to re-plan (pure, injected clock): node loss or join at once; traffic drift only when it lasts.

`decide(config, state, snapshot)` compares the live cluster (alive nodes, observed usage per expert)
with what the current plan was made for, and returns a decision plus the next state. Drift is the
total-variation distance between the usage the plan assumed and the usage observed; it must exceed
`drift_threshold` for `drift_hold_s` (and `min_interval_s` must have passed since the last plan) to
trigger, and it only clears again below `drift_threshold * clear_ratio`, so a mix hovering at the
threshold does not make the placement flap. The glue that polls the cluster, observes usage and applies
new plans is `cluster.controller`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field


class ReplanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    drift_threshold: float = Field(0.2, gt=0, le=1, description="total-variation distance of usage that counts as drift")
    clear_ratio: float = Field(0.5, gt=0, lt=1, description="drift clears below threshold x this (hysteresis)")
    drift_hold_s: float = Field(30.0, ge=0, description="drift must last this long")
    min_interval_s: float = Field(60.0, ge=0, description="at least this long between drift re-plans")


@dataclass(frozen=True)
class ClusterSnapshot:
    now_s: float
    nodes: frozenset[str]  # alive nodes
    usage: dict[str, float]  # observed P(expert invoked) per request


@dataclass(frozen=True)
class ReplanState:
    planned_nodes: frozenset[str]
    planned_usage: dict[str, float]
    last_plan_s: float
    drift_since_s: float | None = None


@dataclass(frozen=True)
class Decision:
    replan: bool
    reason: str = ""
    drift: float = 0.0


def usage_drift(a: dict[str, float], b: dict[str, float]) -> float:
    """Total-variation distance between two usage vectors, each normalised to sum 1."""
    keys = set(a) | set(b)
    sa, sb = sum(a.values()) or 1.0, sum(b.values()) or 1.0
    return 0.5 * sum(abs(a.get(k, 0.0) / sa - b.get(k, 0.0) / sb) for k in keys)


def decide(cfg: ReplanConfig, state: ReplanState, snap: ClusterSnapshot) -> tuple[Decision, ReplanState]:
    lost, joined = state.planned_nodes - snap.nodes, snap.nodes - state.planned_nodes
    drift = usage_drift(state.planned_usage, snap.usage) if snap.usage else 0.0
    if lost or joined:
        parts = ([f"node lost: {', '.join(sorted(lost))}"] if lost else []) + (
            [f"node joined: {', '.join(sorted(joined))}"] if joined else [])
        return Decision(True, "; ".join(parts), drift), _planned(state, snap)
    if drift >= cfg.drift_threshold:
        since = state.drift_since_s if state.drift_since_s is not None else snap.now_s
        held = snap.now_s - since >= cfg.drift_hold_s
        rested = snap.now_s - state.last_plan_s >= cfg.min_interval_s
        if held and rested:
            return Decision(True, f"traffic drift {drift:.2f} for {snap.now_s - since:.0f} s", drift), _planned(state, snap)
        return Decision(False, "drift pending", drift), replace(state, drift_since_s=since)
    if drift < cfg.drift_threshold * cfg.clear_ratio:
        return Decision(False, "", drift), replace(state, drift_since_s=None)
    return Decision(False, "", drift), state  # inside the hysteresis band: keep whatever was pending


def _planned(state: ReplanState, snap: ClusterSnapshot) -> ReplanState:
    return ReplanState(planned_nodes=snap.nodes, planned_usage=dict(snap.usage) or state.planned_usage,
                       last_plan_s=snap.now_s, drift_since_s=None)
