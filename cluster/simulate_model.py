"""The simulator's inputs and outputs: experts with their costs, requests, the machine, the policies, the results.

Costs are the profile's: an expert's batch of n calls takes K*n + B ms on the device, and a switch (a load onto the
device) takes the measured time from its tier when given (`load_from_host_ms`, `load_from_disk_ms`), else its bytes
over the tier's bandwidth plus a fixed cost (`SimConfig`). A request is a chain of expert calls in dependency order:
each call is queued when the one before it finishes (a component expert, then the shared detector it triggered).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.experts.arrange import ArrangePolicy
from expertmesh.experts.eviction import EvictionPolicy


@dataclass(frozen=True)
class SimExpert:
    num_bytes: int
    k_ms_per_item: float  # the profile's fit: a batch of n takes k*n + b ms
    b_ms: float
    max_batch: int = 32  # the profile's best batch
    usage: float = 0.0  # probability a request calls it (the usage profile)
    upstreams: frozenset[str] = frozenset()  # experts whose results can call it (the dependency graph)
    load_from_host_ms: float | None = None  # measured host -> device move; None: bytes over the config's bandwidth
    load_from_disk_ms: float | None = None  # measured disk -> device move; None: likewise

    def batch_ms(self, num_calls: int) -> float:
        return self.k_ms_per_item * num_calls + self.b_ms


@dataclass(frozen=True)
class SimRequest:
    arrival_ms: float  # from its task's start
    chain: tuple[str, ...]  # expert calls in dependency order: each queued when the previous one finishes
    task: int = 0  # tasks run one at a time, each from the same warm start; a task's arrivals count from its start


class AssignPolicy(str, enum.Enum):
    SINGLE = "single"  # one executor holds the whole device
    ROUND_ROBIN = "round_robin"  # parallel executors, calls dealt in turn
    PREDICTED = "predicted"  # parallel executors, router/assign.py: the one predicted to finish the call first


class SimConfig(BaseModel):
    """The simulated machine: one device shared by its executors, host memory, disk; and the arrange wait bound."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_budget_bytes: int = Field(gt=0, description="device memory for experts and batch activations")
    host_budget_bytes: int = Field(ge=0, description="host memory that keeps experts evicted from the device")
    num_parallel_executors: int = Field(2, ge=1, description="executors sharing the device in parallel policies; "
                                                            "the device budget is divided among their pools")
    activation_reserve_bytes: int = Field(0, ge=0, description="kept per executor for batch activations")
    host_to_device_bytes_per_s: float = Field(gt=0)
    host_load_fixed_ms: float = Field(0.0, ge=0)
    disk_bytes_per_s: float = Field(gt=0)
    disk_load_fixed_ms: float = Field(0.0, ge=0)
    max_wait_ms: float = Field(2000.0, gt=0, description="arrange's bound: a call waiting this long goes next")
    warm_start: bool = Field(True, description="each task starts with the most used experts in the device pools "
                                               "(dealt in turn), then the host tier, as a running system would")
    closed_loop_stations: int | None = Field(
        None, ge=1, description="closed loop: this many stations, each sending its next request (in the requests' "
                                "order) when its last one was answered; the requests' arrival times are ignored. "
                                "None: open loop, at the arrival times")
    call_overhead_ms: float = Field(
        0.0, ge=0, description="executor time per call beyond the profile's K*n+B, serial with compute: the serving "
                               "path inside a replica (request handling, deserialisation, the event loop)")
    warmup_requests: int = Field(
        0, ge=0, description="closed loop: the first this many requests run first, to the last answer (a warm-up, as "
                             "the memory benchmark's); counters, latencies and the makespan count the rest")
    turnaround_ms: float = Field(
        0.0, ge=0, description="closed loop: from a request's answer to its station's next request reaching the "
                               "device (the serving path outside the executors: client, proxy, handle, transfer)")

    def num_executors(self, assign: AssignPolicy) -> int:
        return 1 if assign is AssignPolicy.SINGLE else self.num_parallel_executors

    def pool_budget_bytes(self, num_executors: int) -> int:
        return (self.device_budget_bytes - num_executors * self.activation_reserve_bytes) // num_executors


class PolicySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str
    assign: AssignPolicy
    arrange: ArrangePolicy
    evict: EvictionPolicy
    # The host tier drops copies by experts/tiering.py's rule for `evict` (CoServe: least used first; LRU, FIFO:
    # least recently used first); True: least recently used first whatever `evict` is (the baselines' rule).
    host_tier_lru: bool = False


POLICIES: dict[str, PolicySpec] = {
    "expertmesh": PolicySpec(label="ExpertMesh (assign + arrange + evict)", assign=AssignPolicy.PREDICTED,
                             arrange=ArrangePolicy.COSERVE, evict=EvictionPolicy.COSERVE),
    "fcfs_lru": PolicySpec(label="FCFS + LRU", assign=AssignPolicy.SINGLE, arrange=ArrangePolicy.FCFS,
                           evict=EvictionPolicy.LRU),
    "fcfs_fifo": PolicySpec(label="FCFS + FIFO", assign=AssignPolicy.SINGLE, arrange=ArrangePolicy.FCFS,
                            evict=EvictionPolicy.FIFO),
    "round_robin": PolicySpec(label="round-robin parallel executors (FCFS + LRU each)",
                              assign=AssignPolicy.ROUND_ROBIN, arrange=ArrangePolicy.FCFS, evict=EvictionPolicy.LRU),
    "eviction_only": PolicySpec(label="eviction only (FCFS + CoServe eviction)", assign=AssignPolicy.SINGLE,
                                arrange=ArrangePolicy.FCFS, evict=EvictionPolicy.COSERVE),
    "evict_arrange": PolicySpec(label="+ arrange", assign=AssignPolicy.SINGLE, arrange=ArrangePolicy.COSERVE,
                                evict=EvictionPolicy.COSERVE),
}
#: The ablation in CoServe's order: nothing, + eviction, + arrange, + assign (the last is ExpertMesh itself).
ABLATION: tuple[str, ...] = ("fcfs_lru", "eviction_only", "evict_arrange", "expertmesh")
BASELINE = "fcfs_lru"


@dataclass(frozen=True)
class SimResult:
    num_requests: int
    makespan_ms: float  # summed over tasks: each task from its first arrival to its last answer
    switches: int  # loads onto a device
    loads_from_host: int
    loads_from_disk: int
    demotions_to_host: int  # device evictions kept in host memory
    dropped_to_disk: int  # device evictions the host tier could not keep, and host-tier evictions
    evictions: dict[str, int]  # device evictions by reason
    num_batches: int
    num_calls: int
    p50_ms: float  # request latency: arrival to the answer of its last call
    p99_ms: float
    peak_device_bytes: int
    peak_pool_bytes: tuple[int, ...]
    peak_host_bytes: int
    num_executors: int
    pool_budget_bytes: int
    task_throughput_per_s: tuple[float, ...] = field(default=())

    @property
    def throughput_per_s(self) -> float:
        return self.num_requests / (self.makespan_ms / 1000.0) if self.makespan_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"throughput_per_s": self.throughput_per_s,
                               "mean_batch_size": self.num_calls / self.num_batches if self.num_batches else 0.0}
