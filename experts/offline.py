"""The whole CoE run offline on a batch of images, exactly as serving runs it, batched per expert.

The router model classifies every image; `router.plan` routes each (rules, table, fallback); the
plan then runs in waves - every pending call of every image batched per expert - following the
dependency triggers on each output. Used by the accuracy report and by the profiler (usage
probabilities and dependency weights measured on a generated sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expertmesh.experts.runtime import ExpertRuntime, Prediction
from expertmesh.experts.spec import CoESpec, ExpertSpec, resolve_checkpoint
from expertmesh.router.plan import Call, ExpertOutput, RequestMeta, route
from expertmesh.router.waves import PlanInFlight, record, take_calls

BATCH = 256


def load_runtime(spec: CoESpec, e: ExpertSpec, zoo_root: Path) -> ExpertRuntime:
    rt = ExpertRuntime(e, resolve_checkpoint(e, Path(zoo_root)), device="cpu", image_limits=spec.image)
    rt.load()
    return rt


def predict(rt: ExpertRuntime, images: np.ndarray) -> list[Prediction]:
    out: list[Prediction] = []
    for s in range(0, len(images), BATCH):
        out += rt.infer(rt.pixel_values(images[s:s + BATCH]))
    return out


def probabilities(rt: ExpertRuntime, images: np.ndarray) -> np.ndarray:
    """Every image's softmax over the expert's labels [N, K] (what an operating point is chosen on)."""
    out = [rt.probabilities(rt.pixel_values(images[s:s + BATCH])).numpy() for s in range(0, len(images), BATCH)]
    return np.concatenate(out) if out else np.zeros((0, len(rt.spec.labels)), dtype=np.float32)


@dataclass
class ImageRun:
    """One image through the CoE: the router's prediction and every call made, with its output."""

    router: Prediction
    calls: list[tuple[Call, ExpertOutput]] = field(default_factory=list)

    @property
    def outputs(self) -> list[ExpertOutput]:
        return [o for _, o in self.calls]


def run_coe(spec: CoESpec, runtimes: dict[str, ExpertRuntime], images: np.ndarray,
            meta: RequestMeta | None = None) -> list[ImageRun]:
    """Every image through the CoE: the router model on all of them, then the plans in waves (`router.waves`)."""
    router_preds = predict(runtimes[spec.router.expert], images)
    runs = [ImageRun(p) for p in router_preds]
    plans = {i: PlanInFlight.start(route(spec, p.label, p.score, meta).calls) for i, p in enumerate(router_preds)}
    while wave := take_calls(plans):
        for name, items in wave.items():
            idx = [i for i, _ in items]
            for (i, call), pred in zip(items, predict(runtimes[name], images[idx])):
                out = ExpertOutput(name, pred.label, pred.score)
                runs[i].calls.append((call, out))
                record(spec, plans[i], call, out)
    return runs
