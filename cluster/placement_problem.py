"""The placement problem: experts with their memory, load and miss cost, nodes, dependency edges, the config,
and the `Plan` a planner returns; the arithmetic both planners share (a node's device bytes, the balance bound,
the merged edges, the miss costs). Pure. The planners are `cluster.placement` (exact, and the entry points) and
`cluster.placement_heuristic`."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class ExpertDemand(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    memory_bytes: int = Field(ge=0, description="its weights: what the device holds while it is resident")
    activation_bytes: int = Field(0, ge=0, description="a batch's activations at its serving batch: a node's pool "
                                                       "keeps room for the largest batch of what it may run")
    load: float = Field(0.0, ge=0, description="compute demand, e.g. core-seconds per second")
    everywhere: bool = Field(False, description="a replica on every node (the router's classifier)")
    miss_cost: float | None = Field(None, ge=0, description="cost of a home whose device does not hold it, in the cut "
                                                           "weight's unit (calls/s): the switches it will make; None: "
                                                           "more than any cut (kept on the device whenever it fits)")


class NodeCapacity(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    memory_bytes: int = Field(gt=0)
    labels: dict[str, str] = Field(default_factory=dict)
    cpus: float = Field(0.0, ge=0, description="logical CPUs (executor sizing's compute slots); 0: not known")
    gpus: float = Field(0.0, ge=0, description="GPUs: with none, the device is host memory and a switch a copy on "
                                               "the CPU")
    host_memory_bytes: int | None = Field(None, ge=0, description="host memory for copies of the weights; None: as "
                                                                  "much as the device on a CPU node, unbounded on a GPU "
                                                                  "node (the host replica's own rule)")


class Edge(BaseModel):
    model_config = ConfigDict(frozen=True)

    upstream: str
    downstream: str
    weight: float = Field(ge=0, description="dependent calls per second (or per request)")


class PlacementConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    balance_slack: float = Field(0.25, ge=0, description="a node's compute load may exceed the mean by this share "
                                                        "(plus the largest single expert)")
    allow_replicas: bool = True
    exact_max_variables: int = Field(600, ge=1, description="instances up to this many binaries are solved exactly")
    time_limit_s: float = Field(20.0, gt=0)
    memory_tiebreak: float = Field(1e-6, ge=0, description="weight of memory used in the objective, per MiB")
    balance_tiebreak: float = Field(1e-3, ge=0, description="weight of the busiest node's share of all load")
    move_penalty: float = Field(0.01, ge=0, description="cost (in cut calls/s) of a replica on a node the current "
                                                       "placement does not have it on: re-plans move few experts")


class PlacementProblem(BaseModel):
    model_config = ConfigDict(frozen=True)

    experts: list[ExpertDemand]
    nodes: list[NodeCapacity]
    edges: list[Edge]
    config: PlacementConfig = Field(default_factory=PlacementConfig)
    current: dict[str, list[str]] = Field(default_factory=dict, description="the placement running now (expert -> "
                                                                            "nodes), when re-planning")


@dataclass
class Plan:
    homes: dict[str, str]  # expert -> home node
    replicas: dict[str, list[str]]  # expert -> every node holding it (home first)
    memory_used_bytes: dict[str, int]
    load: dict[str, float]
    cut_edges: list[tuple[str, str, str, float]]  # (upstream, downstream, node where the call leaves, weight)
    cut_weight: float
    total_weight: float
    method: str
    reasons: dict[str, str] = field(default_factory=dict)
    moved: list[str] = field(default_factory=list)  # experts given a node the current placement does not have them on
    offloaded: dict[str, list[str]] = field(default_factory=dict)  # node -> homes its device does not hold
    miss_cost: float = 0.0  # the offloaded homes' summed miss cost
    executors: dict[str, dict] = field(default_factory=dict)  # node -> its pooled hosts (memory model), when sized

    @property
    def internal_share(self) -> float:
        return 1.0 - self.cut_weight / self.total_weight if self.total_weight > 0 else 1.0


def miss_costs(p: PlacementProblem) -> dict[str, float]:
    """Each expert's miss cost; an unknown one is more than every cut together, so memory decides it alone."""
    unknown = 1.0 + sum(e.weight for e in p.edges)
    return {e.name: unknown if e.miss_cost is None else e.miss_cost for e in p.experts}


def device_capacity(p: PlacementProblem, node: NodeCapacity) -> int:
    """A node's memory for movable experts: what the every-node experts (in the router) leave."""
    return max(0, node.memory_bytes - sum(e.memory_bytes for e in p.experts if e.everywhere))


def node_bytes(by_name: dict[str, ExpertDemand], held: set[str] | list[str], resident: set[str] | list[str]) -> int:
    """What a node's pool needs on its device: the weights of the experts it holds there, and room for the largest
    batch's activations among every expert it may run (one batch at a time per executor)."""
    return (sum(by_name[e].memory_bytes for e in resident)
            + max((by_name[e].activation_bytes for e in held), default=0))


def balance_bound(p: PlacementProblem) -> float:
    movable = [e.load for e in p.experts if not e.everywhere]
    if not movable or sum(movable) == 0:
        return float("inf")
    return (1.0 + p.config.balance_slack) * sum(movable) / len(p.nodes) + max(movable)


def merged_edges(p: PlacementProblem) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for e in p.edges:
        if e.upstream != e.downstream and e.weight > 0:
            out[(e.upstream, e.downstream)] = out.get((e.upstream, e.downstream), 0.0) + e.weight
    return dict(sorted(out.items()))


Solved = tuple[dict[str, str], dict[str, set[str]], set[str]]  # homes, replicas, homes off the device
