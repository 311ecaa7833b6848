"""The memory-limited benchmark's CoE, as a structure: which experts, categories and dependency edges a config implies.

Pure code, no torch. `MemoryWorkloadConfig` says how many experts of each size; `plan_layout` turns it into a
`WorkloadLayout`: the names, labels and architectures of every expert, the component-type categories with their
Zipf-like probabilities, and the dependency edges (each with a target trigger rate; `memory_workload_calibrate`
picks the trigger labels that land near it once the seeded models exist). The small experts split into

  1 router (task route; its labels are the categories)
  component experts (one per category table; a pair of similar component types shares one), chain length 1
  check experts (small, downstream of some component experts), chain length 2
  fine experts (small, downstream of a detector), chain length 3

and every large (ResNet-18-class) expert is a shared detector downstream of the component experts, so the bytes that
must move when memory is short are the detectors'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

SMALL_ARCHITECTURE = {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1], "layer_type": "basic"}
LARGE_ARCHITECTURE = {"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2],
                      "layer_type": "basic"}
#: the category mix of the spec: P(category of rank r) proportional to 1 / r**SPEC_ZIPF_S
SPEC_ZIPF_S = 1.1
MIN_SMALL_EXPERTS = 4
MAX_SMALL_EXPERTS = 2000
MAX_LARGE_EXPERTS = 64
MIN_INPUT_SIZE_PX = 32
MAX_INPUT_SIZE_PX = 512

# Similar component types in adjacent pairs: when categories outnumber component experts, a pair shares one.
COMPONENT_TYPES = (
    "chip_resistor", "resistor_array", "chip_capacitor", "mlcc_large", "chip_inductor", "ferrite_bead",
    "tantalum_capacitor", "electrolytic_capacitor", "sot23", "sot223", "soic", "ssop", "tssop", "msop", "qfp", "lqfp",
    "qfn", "dfn", "bga", "csp", "diode", "zener_diode", "led", "led_array", "crystal", "oscillator", "connector",
    "pin_header", "relay", "switch", "fuse", "ptc_fuse",
)
COMPONENT_LABELS = ("ok", "missing", "misaligned", "tombstone", "solder_suspect", "lifted_lead")
DETECTORS = ("solder_joint", "bridge", "void", "crack", "foreign_object", "lead_form", "body_damage", "wetting")
DETECTOR_LABELS = ("ok", "suspect", "defect", "severe")
CHECKS = ("polarity", "marking", "coplanarity", "fillet", "lead_bend", "skew", "label", "height")
CHECK_LABELS = ("ok", "fail")
FINE_LABELS = ("ok", "defect_confirmed", "false_call")

# Target P(trigger | upstream ran) ranges per edge kind; each edge draws its target from its range (seeded).
TARGET_RATES = {"detector": (0.30, 0.60), "check": (0.15, 0.35), "fine": (0.10, 0.30)}
# Dirichlet weights of the label mix each expert is calibrated to (the pass label first and heaviest), blended with
# LABEL_MIX_FLOOR of the uniform mix so that no label is (nearly) never given.
LABEL_MIX_WEIGHTS = {"component": (4, 1, 1, 1, 1, 1), "detector": (3, 1, 1, 1), "check": (3, 1), "fine": (2, 1, 1)}
LABEL_MIX_FLOOR = 0.25


class MemoryWorkloadConfig(BaseModel):
    """How big a CoE the memory-limited benchmark serves. The defaults make 48 experts, about 0.37 GB."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_small_experts: int = 40
    num_large_experts: int = 8
    input_size_px: int = 64
    seed: int = 0

    @field_validator("num_small_experts")
    @classmethod
    def _small(cls, v: int) -> int:
        if not MIN_SMALL_EXPERTS <= v <= MAX_SMALL_EXPERTS:
            raise ValueError(f"num_small_experts is {v}; the CoE needs the router, a component, a check and a fine "
                             f"expert: use {MIN_SMALL_EXPERTS} to {MAX_SMALL_EXPERTS}")
        return v

    @field_validator("num_large_experts")
    @classmethod
    def _large(cls, v: int) -> int:
        if not 1 <= v <= MAX_LARGE_EXPERTS:
            raise ValueError(f"num_large_experts is {v}; each is a ~45 MB ResNet-18-class detector: "
                             f"use 1 to {MAX_LARGE_EXPERTS}")
        return v

    @field_validator("input_size_px")
    @classmethod
    def _size(cls, v: int) -> int:
        if not MIN_INPUT_SIZE_PX <= v <= MAX_INPUT_SIZE_PX:
            raise ValueError(f"input_size_px is {v}; the ResNets downsample 32x: use {MIN_INPUT_SIZE_PX} to "
                             f"{MAX_INPUT_SIZE_PX}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"seed is {v}; use a seed of 0 or more")
        return v

    @model_validator(mode="after")
    def _every_detector_has_an_upstream(self) -> MemoryWorkloadConfig:
        counts = role_counts(self.num_small_experts)
        if counts.components < self.num_large_experts:
            need = next(n for n in range(self.num_small_experts, MAX_SMALL_EXPERTS + 1)
                        if role_counts(n).components >= self.num_large_experts)
            raise ValueError(f"num_small_experts {self.num_small_experts} gives {counts.components} component experts, "
                             f"fewer than num_large_experts {self.num_large_experts} (each detector needs an upstream "
                             f"component expert); "
                             f"raise num_small_experts to {need} or lower num_large_experts")
        return self


@dataclass(frozen=True)
class RoleCounts:
    components: int
    checks: int
    fines: int


def role_counts(num_small_experts: int) -> RoleCounts:
    """How the small experts besides the router divide: ~60% component, ~20% check, ~20% fine (at least one each)."""
    rest = num_small_experts - 1
    checks = max(1, round(0.2 * rest))
    fines = max(1, round(0.2 * rest))
    return RoleCounts(components=rest - checks - fines, checks=checks, fines=fines)


def num_categories(num_components: int) -> int:
    """A quarter more component types than component experts: the extra types share an expert with a similar type."""
    return num_components + math.ceil(num_components / 4)


@dataclass(frozen=True)
class ExpertLayout:
    name: str
    role: str  # "router" | "component" | "check" | "fine" | "detector"
    labels: tuple[str, ...]
    pass_labels: tuple[str, ...]
    large: bool


@dataclass(frozen=True)
class EdgeLayout:
    upstream: str
    downstream: str
    kind: str  # "detector" (component -> detector), "check" (component -> check), "fine" (detector -> fine)
    target_rate: float


@dataclass(frozen=True)
class WorkloadLayout:
    experts: tuple[ExpertLayout, ...]
    categories: tuple[tuple[str, str, float], ...]  # (category, component expert, probability), most likely first
    edges: tuple[EdgeLayout, ...]  # components' edges first, then detectors': an upstream's rate is known downstream
    label_mix: dict[str, tuple[float, ...]]  # expert -> the label shares its classifier bias is calibrated to

    def expert(self, name: str) -> ExpertLayout:
        return next(e for e in self.experts if e.name == name)

    def component_probabilities(self) -> dict[str, float]:
        """P(a request's table call is this component expert), from the category mix."""
        out: dict[str, float] = {}
        for _, expert, p in self.categories:
            out[expert] = out.get(expert, 0.0) + p
        return out


def numbered(base: tuple[str, ...], n: int) -> list[str]:
    """The first n names of `base`, then `base` again with _2, _3, ... suffixes."""
    return [base[i % len(base)] + ("" if i < len(base) else f"_{i // len(base) + 1}") for i in range(n)]


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return w / w.sum()


def _fine_name(detector: str, k: int) -> str:
    """A detector's fine experts: <detector stem>_fine, then _fine_2, _fine_3, ... when fines outnumber detectors."""
    return detector.removesuffix("_detector") + "_fine" + (f"_{k + 1}" if k else "")


def plan_layout(config: MemoryWorkloadConfig) -> WorkloadLayout:
    """The CoE a config implies (deterministic for config.seed)."""
    rng = np.random.default_rng([config.seed, 0x4C41594F])
    counts = role_counts(config.num_small_experts)
    types = numbered(COMPONENT_TYPES, num_categories(counts.components))
    groups = np.array_split(np.arange(len(types)), counts.components)  # contiguous: the first groups hold a pair
    components = [f"{types[g[0]]}_defect" for g in groups]
    detectors = [f"{d}_detector" for d in numbered(DETECTORS, config.num_large_experts)]
    checks = [f"{c}_check" for c in numbered(CHECKS, counts.checks)]
    fine_parent = [f % len(detectors) for f in range(counts.fines)]
    fines = [_fine_name(detectors[d], f // len(detectors)) for f, d in enumerate(fine_parent)]

    ranks = rng.permutation(len(types))  # which type is the most common is seeded, not alphabetical
    probs = zipf_probabilities(len(types), SPEC_ZIPF_S)
    expert_of = {types[t]: components[i] for i, g in enumerate(groups) for t in g}
    categories = tuple((types[t], expert_of[types[t]], float(probs[r])) for r, t in enumerate(ranks))

    experts = [ExpertLayout("component_router", "router", tuple(types), (), False)]
    experts += [ExpertLayout(n, "component", COMPONENT_LABELS, ("ok",), False) for n in components]
    experts += [ExpertLayout(n, "check", CHECK_LABELS, ("ok",), False) for n in checks]
    experts += [ExpertLayout(n, "fine", FINE_LABELS, ("ok", "false_call"), False) for n in fines]
    experts += [ExpertLayout(n, "detector", DETECTOR_LABELS, ("ok",), True) for n in detectors]

    def target(kind: str) -> float:
        lo, hi = TARGET_RATES[kind]
        return round(float(rng.uniform(lo, hi)), 3)

    edges = [EdgeLayout(c, detectors[i % len(detectors)], "detector", target("detector"))
             for i, c in enumerate(components)]
    num_checking = min(len(components), max(len(checks), len(components) // 2))
    checking = np.unique(np.round(np.linspace(0, len(components) - 1, num_checking)).astype(int))
    edges += [EdgeLayout(components[c], checks[j % len(checks)], "check", target("check"))
              for j, c in enumerate(checking)]
    edges += [EdgeLayout(detectors[d], fines[f], "fine", target("fine")) for f, d in enumerate(fine_parent)]

    label_mix = {"component_router": tuple(p for _, _, p in sorted(categories, key=lambda c: types.index(c[0])))}
    for e in experts[1:]:
        mix = (1 - LABEL_MIX_FLOOR) * rng.dirichlet(LABEL_MIX_WEIGHTS[e.role]) + LABEL_MIX_FLOOR / len(e.labels)
        label_mix[e.name] = tuple(float(x) for x in mix)
    return WorkloadLayout(tuple(experts), categories, tuple(edges), label_mix)
