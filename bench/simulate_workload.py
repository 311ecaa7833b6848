"""A seeded CoE workload at CoServe's scale for the simulator (CoServe, ASPLOS 2025: PCB inspection). Pure.

The defaults are the issue's numbers: 350 component experts of about 170 MiB (ResNet-101 class) plus shared
detectors (YOLOv5 class) that some component results trigger (several component experts share one detector), about
60 GiB in all; a 12 GiB device, 16 GiB host memory, disk at 530 MB/s; an image every 4 ms; tasks of 2,500-3,500
images; a skewed (Zipf) category mix. Each task is one board type: its mix is the factory's Zipf mix with a
per-task random factor per category (boards differ), while the policies' usage probabilities are the factory mix
(what a usage profile knows). The costs are GPU-ish values chosen below, each with where it comes from (`COST_NOTES`).
"""

from __future__ import annotations

import math
import random

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.cluster.simulate_model import SimConfig, SimExpert, SimRequest

MIB, GIB = 2**20, 2**30

COST_NOTES = {
    "component_expert": "ResNet-101 class (44.5 M parameters, 7.8 GMAC per 224 px image), fp32 on a 12 GB consumer "
                        "GPU (RTX 3060 class, ~12.7 TFLOPS fp32): 15.6 GFLOP at ~40% utilisation is ~3 ms per "
                        "image (K); ~300 kernel launches of eager PyTorch are ~10 ms per batch (B); batch 1 ~13 ms, "
                        "best batch 32 (per-image time flat beyond). CoServe quotes ~35 ms per inference on its "
                        "machine, with pre/post-processing: --compute-scale raises K and B to test that",
    "detector": "YOLOv5l class (46.5 M parameters, ~109 GFLOP at 640 px): ~9 ms per image (K), 10 ms per batch "
                "(B), best batch 16",
    "host_to_device": "4 GB/s + 5 ms: a pageable host -> device copy of a state dict (pinned PCIe 3/4 x16 reaches "
                      "12-25 GB/s); a 170 MiB switch from host is then ~50 ms = ~80% of a batch-1 request's latency, "
                      "inside CoServe's measured 63-86%",
    "disk": "530 MB/s (the issue's SSD) + 5 ms to open and read the header: ~340 ms per 170 MiB expert = ~96% of a "
            "batch-1 request's latency, inside CoServe's measured 91-99%",
    "activation_reserve": "1 GiB per executor for batch activations (a batch of 32 224 px images through ResNet-101 "
                          "in fp32 inference peaks at a few hundred MiB), taken from the device budget",
}


class WorkloadSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    num_tasks: int = Field(5, ge=1)
    min_task_requests: int = Field(2500, ge=1)
    max_task_requests: int = Field(3500, ge=1)
    interarrival_ms: float = Field(4.0, gt=0, description="one image every ...")
    num_component_experts: int = Field(350, ge=1)
    component_mib: float = Field(170.0, gt=0, description="mean size; each within +-10%")
    num_detectors: int = Field(12, ge=0)
    detector_mib: float = Field(160.0, gt=0)
    detector_share: float = Field(0.4, ge=0, le=1, description="fraction of component types with a detector after")
    trigger_probability: float = Field(0.3, ge=0, le=1, description="P(a component result calls its detector)")
    zipf_exponent: float = Field(1.0, ge=0, description="the factory mix: P(rank r) ~ 1 / r**s")
    task_mix_sigma: float = Field(1.0, ge=0, description="per-task lognormal factor on each category's weight")
    categories_per_task: int | None = Field(None, ge=1, description="component types on a task's board type, drawn "
                                                                   "by the factory mix (None: every type)")
    component_k_ms: float = 3.0
    component_b_ms: float = 10.0
    component_max_batch: int = 32
    detector_k_ms: float = 9.0
    detector_b_ms: float = 10.0
    detector_max_batch: int = 16
    compute_scale: float = Field(1.0, gt=0, description="multiplies every K and B (a slower or faster device)")

    @classmethod
    def quick(cls, **overrides) -> WorkloadSettings:
        """A small version (seconds): 40 component experts, 2 detectors, 2 tasks of 250-350 images."""
        return cls(**({"num_tasks": 2, "min_task_requests": 250, "max_task_requests": 350,
                       "num_component_experts": 40, "num_detectors": 2} | overrides))


def machine(settings: WorkloadSettings, *, device_gib: float = 12.0, host_gib: float = 16.0,
            num_parallel_executors: int = 2) -> SimConfig:
    """The issue's machine (scaled with the number of component experts for a smaller workload)."""
    scale = settings.num_component_experts / 350
    return SimConfig(device_budget_bytes=int(device_gib * scale * GIB), host_budget_bytes=int(host_gib * scale * GIB),
                     num_parallel_executors=num_parallel_executors,
                     activation_reserve_bytes=int(scale * GIB),
                     host_to_device_bytes_per_s=4e9, host_load_fixed_ms=5.0, disk_bytes_per_s=530e6,
                     disk_load_fixed_ms=5.0)


def component_names(num: int) -> list[str]:
    return [f"component_{i:03d}" for i in range(num)]


def build_workload(s: WorkloadSettings) -> tuple[dict[str, SimExpert], list[SimRequest]]:
    """Experts (component experts, then detectors) and every task's requests, the same for the same settings."""
    if s.min_task_requests > s.max_task_requests:
        raise ValueError("min_task_requests must be <= max_task_requests")
    rng = random.Random(s.seed)
    components = component_names(s.num_component_experts)
    detectors = [f"detector_{j:02d}" for j in range(s.num_detectors)]
    ranks = list(range(1, len(components) + 1))
    rng.shuffle(ranks)  # which category is common is random
    weight = {c: 1.0 / r ** s.zipf_exponent for c, r in zip(components, ranks)}
    total = sum(weight.values())
    factory_mix = {c: w / total for c, w in weight.items()}
    with_detector = rng.sample(components, round(s.detector_share * len(components))) if detectors else []
    detector_of = {c: detectors[i % len(detectors)] for i, c in enumerate(with_detector)}
    upstreams = {d: frozenset(c for c, dd in detector_of.items() if dd == d) for d in detectors}
    experts = {}
    for c in components:
        experts[c] = SimExpert(num_bytes=int(s.component_mib * MIB * rng.uniform(0.9, 1.1)),
                               k_ms_per_item=s.component_k_ms * s.compute_scale,
                               b_ms=s.component_b_ms * s.compute_scale, max_batch=s.component_max_batch,
                               usage=factory_mix[c])
    for d in detectors:
        experts[d] = SimExpert(num_bytes=int(s.detector_mib * MIB * rng.uniform(0.9, 1.1)),
                               k_ms_per_item=s.detector_k_ms * s.compute_scale, b_ms=s.detector_b_ms * s.compute_scale,
                               max_batch=s.detector_max_batch,
                               usage=s.trigger_probability * sum(factory_mix[c] for c in upstreams[d]),
                               upstreams=upstreams[d])
    requests = []
    for task in range(s.num_tasks):
        on_board = _weighted_sample(rng, factory_mix, s.categories_per_task or len(components))
        task_weights = [factory_mix[c] * math.exp(rng.gauss(0.0, s.task_mix_sigma)) for c in on_board]
        num = rng.randint(s.min_task_requests, s.max_task_requests)
        for i, c in enumerate(rng.choices(on_board, task_weights, k=num)):
            triggered = c in detector_of and rng.random() < s.trigger_probability
            requests.append(SimRequest(i * s.interarrival_ms, (c, detector_of[c]) if triggered else (c,), task))
    return experts, requests


def _weighted_sample(rng: random.Random, weights: dict[str, float], num: int) -> list[str]:
    """`num` distinct keys drawn without replacement, each draw by weight (in the dict's order when num is all)."""
    if num >= len(weights):
        return list(weights)
    keys = sorted(weights, key=lambda k: rng.random() ** (1.0 / weights[k]), reverse=True)  # Efraimidis-Spirakis
    return sorted(keys[:num])


def describe(experts: dict[str, SimExpert], requests: list[SimRequest]) -> dict:
    """What the JSON records about a workload."""
    tasks = sorted({r.task for r in requests})
    return {"num_experts": len(experts),
            "num_detectors": sum(1 for x in experts.values() if x.upstreams),
            "total_bytes": sum(x.num_bytes for x in experts.values()),
            "total_gib": sum(x.num_bytes for x in experts.values()) / GIB,
            "num_requests": len(requests), "num_calls": sum(len(r.chain) for r in requests),
            "task_sizes": [sum(1 for r in requests if r.task == t) for t in tasks],
            "distinct_experts_per_task": [len({e for r in requests if r.task == t for e in r.chain}) for t in tasks]}
