"""The simulator's inputs and outputs: experts with their costs, requests, the machine, the policies, the results.

Costs are the profile's: an expert's batch of n calls takes K*n + B ms on the device, and a switch (a load onto the
device) takes the measured time from its tier when given (`load_from_host_ms`, `load_from_disk_ms`), else its bytes
over the tier's bandwidth plus a fixed cost (`SimConfig`). A request is one component's chain of expert calls in dependency order, or a board of components
(`SimRequest.board`): its calls run in waves, as a pooled host's `run` makes them - every component's first call,
then the calls those outputs triggered once the whole wave is done (a component expert, then the shared detector it
triggered). A request is answered when its last wave is.
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
    triggers: tuple[tuple[str, float], ...] = ()  # (downstream expert, P(triggered per call)): what prefetch reads

    def batch_ms(self, num_calls: int) -> float:
        return self.k_ms_per_item * num_calls + self.b_ms


@dataclass(frozen=True)
class SimRequest:
    arrival_ms: float  # from its task's start
    chain: tuple[str, ...]  # expert calls in dependency order: each queued when the previous one finishes
    task: int = 0  # tasks run one at a time, each from the same warm start; a task's arrivals count from its start
    components: tuple[tuple[str, ...], ...] = ()  # a board: every component's chain (`chain` is the first)
    # more calls of a wave: (component, step, expert) - an output that triggered two experts at once
    branches: tuple[tuple[int, int, str], ...] = ()

    @classmethod
    def board(cls, arrival_ms: float, chains: tuple[tuple[str, ...], ...], task: int = 0,
              branches: tuple[tuple[int, int, str], ...] = ()) -> SimRequest:
        """A board of components: one request whose calls run in waves (step k of every chain together)."""
        if not chains:
            raise ValueError("a board needs at least one component")
        return cls(arrival_ms, chains[0], task, tuple(chains), tuple(branches))

    @property
    def chains(self) -> tuple[tuple[str, ...], ...]:
        return self.components or (self.chain,)

    def wave(self, step: int) -> list[tuple[int, str]]:
        """(component, expert) of every call of wave `step`."""
        return ([(i, c[step]) for i, c in enumerate(self.chains) if step < len(c)]
                + [(i, e) for i, k, e in self.branches if k == step])

    @property
    def experts(self) -> list[str]:
        return [e for c in self.chains for e in c] + [e for _, _, e in self.branches]

    @property
    def num_calls(self) -> int:
        return sum(len(c) for c in self.chains) + len(self.branches)


class AssignPolicy(str, enum.Enum):
    """Which executor takes a request (all of its calls, as a host replica runs the plans it is sent)."""

    SINGLE = "single"  # one executor holds the whole device
    ROUND_ROBIN = "round_robin"  # parallel executors, requests dealt in turn
    POW2 = "pow2"  # parallel executors, Serve's default: the fewer requests in flight of two picked at random
    PREDICTED = "predicted"  # parallel executors, router/assign.py: the one predicted to finish the request first


class SimConfig(BaseModel):
    """The simulated machine: one device's memory divided among its executors (each a pooled host replica with a
    device and a host-memory budget of its own), its compute slots, host memory, disk; the arrange wait bound."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_budget_bytes: int = Field(gt=0, description="device memory for experts and batch activations")
    host_budget_bytes: int | None = Field(ge=0, description="host memory for copies of the experts' weights, divided "
                                                           "among the executors (None: no limit)")
    num_parallel_executors: int = Field(2, ge=1, description="executors sharing the device in parallel policies; "
                                                            "the device and host budgets are divided among them")
    compute_slots: int = Field(1, ge=1, description="batches that can run at once: 1 for one GPU or one CPU core "
                                                    "(the executors take turns), more for several cores")
    loads_use_compute: bool = Field(False, description="a load occupies a compute slot (a CPU copies weights with "
                                                       "the cores that infer); False: a copy engine of its own (GPU)")
    activation_reserve_bytes: int = Field(0, ge=0, description="kept per executor for batch activations")
    host_to_device_bytes_per_s: float = Field(gt=0)
    host_load_fixed_ms: float = Field(0.0, ge=0)
    disk_bytes_per_s: float = Field(gt=0)
    disk_load_fixed_ms: float = Field(0.0, ge=0)
    max_wait_ms: float = Field(2000.0, gt=0, description="arrange's bound: a call waiting this long goes next")
    warm_start: bool = Field(True, description="each task starts with each pool warmed as a host replica warms "
                                               "(experts.tiering.warm_plan: most used first), as a running system")
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
    request_overhead_ms: float = Field(
        0.0, ge=0, description="executor time per request it receives (one host `run`, or one Serve request to a "
                               "multiplexed deployment), serial with compute")
    seed: int = Field(0, description="for the random choices (POW2)")

    def num_executors(self, policy: PolicySpec) -> int:
        if policy.serve_multiplexed:
            return len(policy.serve_multiplexed)
        return 1 if policy.assign is AssignPolicy.SINGLE else self.num_parallel_executors

    def pool_budget_bytes(self, num_executors: int) -> int:
        return (self.device_budget_bytes - num_executors * self.activation_reserve_bytes) // num_executors

    def pool_host_budget_bytes(self, num_executors: int) -> int | None:
        return None if self.host_budget_bytes is None else self.host_budget_bytes // num_executors


class ServeDeployment(BaseModel):
    """A Ray Serve multiplexed deployment of one replica as the simulator runs it (bench/multiplexed_app.py): Serve's
    LRU of `max_models` models by count, `@serve.batch` windows (a window opens at its first call and closes
    `batch_wait_ms` later or at `max_batch_size` images, and windows run in the order they closed, each split by
    model), and the load function's own cache of host-memory copies (least recently used dropped first)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experts: tuple[str, ...]
    max_models: int = Field(ge=1, description="max_num_models_per_replica (K)")
    max_batch_size: int = Field(ge=1, description="@serve.batch max_batch_size, in images")
    batch_wait_ms: float = Field(ge=0, description="@serve.batch batch_wait_timeout_s, in ms")
    host_cache_bytes: int | None = Field(None, ge=0, description="the load function's host copies (None: no limit, "
                                                                 "0: none - every load from disk)")
    load_extra_ms: float = Field(0.0, ge=0, description="added to every load (building the model from scratch)")
    unload_ms: float = Field(0.0, ge=0, description="worker time an eviction takes (a full garbage collection)")


class PolicySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str
    assign: AssignPolicy
    arrange: ArrangePolicy
    evict: EvictionPolicy
    prefetch: bool = False  # after a batch, load likely downstream experts into free memory (experts/prefetch.py)
    # not empty: Ray Serve multiplexing instead of pooled hosts, one executor per deployment (assign/arrange/evict unused)
    serve_multiplexed: tuple[ServeDeployment, ...] = ()


POLICIES: dict[str, PolicySpec] = {
    "expertmesh": PolicySpec(label="ExpertMesh (assign + arrange + evict + prefetch)", assign=AssignPolicy.PREDICTED,
                             arrange=ArrangePolicy.COSERVE, evict=EvictionPolicy.COSERVE, prefetch=True),
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
    "evict_arrange_prefetch": PolicySpec(label="+ prefetch", assign=AssignPolicy.SINGLE, arrange=ArrangePolicy.COSERVE,
                                         evict=EvictionPolicy.COSERVE, prefetch=True),
}
#: The ablation in CoServe's order: nothing, + eviction, + arrange, + prefetch, + assign (the last is ExpertMesh).
ABLATION: tuple[str, ...] = ("fcfs_lru", "eviction_only", "evict_arrange", "evict_arrange_prefetch", "expertmesh")
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
    prefetch_loads: int = 0  # loads made by a prefetch (not switches: the pooled host counts them apart too)
    num_components: int = 0  # components answered (a board counts each; a single request is one)

    @property
    def throughput_per_s(self) -> float:
        return self.num_requests / (self.makespan_ms / 1000.0) if self.makespan_ms > 0 else 0.0

    @property
    def components_per_s(self) -> float:
        return self.num_components / (self.makespan_ms / 1000.0) if self.makespan_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"throughput_per_s": self.throughput_per_s, "components_per_s": self.components_per_s,
                               "mean_batch_size": self.num_calls / self.num_batches if self.num_batches else 0.0}
