"""The whole CoE run offline on a batch of images, exactly as serving runs it, batched per expert.

The router model classifies every image; `router.plan` routes each (rules, table, fallback); the
plan then runs in waves - every pending call of every image batched per expert - following the
dependency triggers on each output. Used by the accuracy report and by the profiler (usage
probabilities and dependency weights measured on a generated sample).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.runtime import ExpertRuntime, Prediction
from expertmesh.experts.spec import CoESpec, ExpertSpec, resolve_checkpoint
from expertmesh.router.plan import Call, ExpertOutput, RequestMeta, route, triggered_calls

BATCH = 256


def load_runtime(spec: CoESpec, e: ExpertSpec, zoo_root: Path) -> ExpertRuntime:
    rt = ExpertRuntime(e, resolve_checkpoint(e, Path(zoo_root)), device="cpu", image_limits=spec.image)
    rt.load()
    return rt


def predict(rt: ExpertRuntime, images: np.ndarray) -> list[Prediction]:
    out: list[Prediction] = []
    for s in range(0, len(images), BATCH):
        out += rt.infer(to_pixel_values(images[s:s + BATCH], rt.spec.input_size_px))
    return out


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
    router_preds = predict(runtimes[spec.router.expert], images)
    runs = [ImageRun(p) for p in router_preds]
    pending: dict[int, list[Call]] = {}
    planned: dict[int, set[str]] = {}
    for i, p in enumerate(router_preds):
        r = route(spec, p.label, p.score, meta)
        pending[i] = list(r.calls)
        planned[i] = {c.expert for c in r.calls}
    while any(pending.values()):
        by_expert: dict[str, list[tuple[int, Call]]] = defaultdict(list)
        for i, calls in pending.items():
            for c in calls:
                by_expert[c.expert].append((i, c))
        pending = {i: [] for i in pending}
        for name, items in sorted(by_expert.items()):
            idx = [i for i, _ in items]
            for (i, call), pred in zip(items, predict(runtimes[name], images[idx])):
                out = ExpertOutput(name, pred.label, pred.score)
                runs[i].calls.append((call, out))
                new = triggered_calls(spec, out, planned[i])
                planned[i].update(c.expert for c in new)
                pending[i] += new
    return runs
