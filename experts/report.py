"""The accuracy report of a built zoo on held-out generated images.

Runs the whole CoE offline exactly as serving does (the router model, then `router.plan`'s rules,
table, dependency triggers and verdict aggregation, with experts loaded by `ExpertRuntime` from
their checkpoints), batched per expert, and the monolithic baselines built beside it on the same images: one of
the CoE's active parameters per image (`monolithic`, built by default), one of its total parameters
(`monolithic_total`, built only when asked: `zoo build --baselines all`); a baseline not built is left out with a note.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel
from tqdm import tqdm

from expertmesh.experts.line_figures import line_figures
from expertmesh.experts.accuracy_tables import SYSTEMS, accuracy_tables
from expertmesh.experts.offline import load_runtime, predict, run_coe
from expertmesh.experts.pcb_aoi import dataset
from expertmesh.experts.pcb_aoi.truth import NO_DEFECT, defect_correct, verdict_correct
from expertmesh.experts.runtime import ExpertRuntime
from expertmesh.experts.spec import CoESpec, resolve_checkpoint
from expertmesh.experts.zoo import BASELINES, is_current, monolithic_spec, read_meta
from expertmesh.router.plan import Verdict, aggregate


class ExpertAccuracy(BaseModel):
    expert: str
    accuracy: float
    num_images: int
    num_parameters: int
    train_seconds: float | None = None  # as the zoo build recorded it in the checkpoint (None: not trained here)


class SystemAccuracy(BaseModel):
    verdict_accuracy: float  # PASS iff the truth is "ok"; UNCERTAIN counts as wrong
    defect_accuracy: float  # the exact defect label (or "ok")
    defect_recall: float | None = None  # of the defective parts, the share with a DEFECT verdict
    num_uncertain: int
    num_images: int
    mean_experts_per_image: float
    active_parameters_per_image: float
    total_parameters: int
    train_seconds: float | None = None  # a baseline's training time as recorded in its checkpoint
    escape_rate: float | None = None  # of the defective parts, the share passed (experts/line_figures.py)
    false_call_rate: float | None = None  # of the good parts, the share not passed
    confusion: dict[str, dict[str, int]] | None = None  # truth (good, defective) -> verdict -> count


class AccuracyReport(BaseModel):
    spec: str
    eval_seed: int
    num_eval_per_pair: int
    router_accuracy: float
    experts: list[ExpertAccuracy]
    coe: SystemAccuracy
    monolithic: SystemAccuracy | None  # matched active parameters per image
    monolithic_total: SystemAccuracy | None = None  # matched total parameters
    seconds: float


def evaluate(spec: CoESpec, zoo_root: Path, *, baseline: bool = True, progress: bool = True) -> AccuracyReport:
    t0 = time.perf_counter()
    zoo_root = Path(zoo_root)
    eval_seed = spec.seed + dataset.EVAL_SEED_OFFSET
    pool = dataset.Pool.generate(dataset.eval_counts(spec), eval_seed, desc="generating held-out images", progress=progress)
    pairs = list(pool.images)
    images = np.concatenate([pool.images[p] for p in pairs])
    truth = [p for p in pairs for _ in range(len(pool.images[p]))]
    runtimes = {e.name: load_runtime(spec, e, zoo_root) for e in spec.experts}
    params = {name: rt.num_parameters for name, rt in runtimes.items()}

    # each expert alone, on the held-out images of the kinds it was trained for
    per_expert = []
    for e in tqdm(spec.experts, desc="expert accuracy", disable=not progress, leave=False):
        samples = dataset.expert_samples(spec, e)
        x, y = pool.arrays_for(samples, e.labels)
        preds = predict(runtimes[e.name], x)
        acc = float(np.mean([e.labels.index(p.label) == t for p, t in zip(preds, y)]))
        per_expert.append(ExpertAccuracy(expert=e.name, accuracy=acc, num_images=len(y), num_parameters=params[e.name],
                                         train_seconds=_train_seconds(resolve_checkpoint(e, zoo_root))))

    # the whole CoE, exactly as serving runs it (route, then the plan in waves batched per expert)
    runs = run_coe(spec, runtimes, images)
    router_acc = float(np.mean([r.router.label == c for r, (c, _) in zip(runs, truth)]))
    outputs = {i: r.outputs for i, r in enumerate(runs)}
    outcomes = [aggregate(spec, outputs[i]) for i in range(len(images))]
    used = [sum(params[o.expert] for o in outputs[i]) + params[spec.router.expert] for i in range(len(images))]
    coe = SystemAccuracy(
        verdict_accuracy=float(np.mean([verdict_correct(o.verdict, d) for o, (_, d) in zip(outcomes, truth)])),
        defect_accuracy=float(np.mean([defect_correct(o.verdict, o.defect, d) for o, (_, d) in zip(outcomes, truth)])),
        defect_recall=_recall([o.verdict for o in outcomes], truth),
        num_uncertain=sum(o.verdict is Verdict.UNCERTAIN for o in outcomes),
        num_images=len(images),
        mean_experts_per_image=float(np.mean([len(outputs[i]) + 1 for i in range(len(images))])),
        active_parameters_per_image=float(np.mean(used)),
        total_parameters=sum(params.values()),
        **line_figures([o.verdict for o in outcomes], [d != NO_DEFECT for _, d in truth]),
    )
    baselines = {name: _baseline_accuracy(spec, zoo_root / directory, match, images, truth) if baseline else None
                 for name, (directory, match) in BASELINES.items()}
    return AccuracyReport(spec=spec.name, eval_seed=eval_seed, num_eval_per_pair=spec.num_eval_per_pair,
                          router_accuracy=router_acc, experts=per_expert, coe=coe, **baselines,
                          seconds=time.perf_counter() - t0)


def _train_seconds(checkpoint_dir: Path) -> float | None:
    train = (read_meta(checkpoint_dir) or {}).get("train")
    return float(train["seconds"]) if train else None


def _recall(verdicts: list[Verdict], truth: list[tuple[str, str]]) -> float:
    found = [v is Verdict.DEFECT for v, (_, d) in zip(verdicts, truth) if d != NO_DEFECT]
    return float(np.mean(found)) if found else 1.0


def _baseline_accuracy(spec: CoESpec, directory: Path, match: str, images: np.ndarray,
                       truth: list[tuple[str, str]]) -> SystemAccuracy | None:
    """A monolithic baseline on the held-out images (None when it is not built, or was built for another version of
    the spec: `make run` does not rebuild baselines, so an old one would be scored as if current, or fail to load):
    its verdict is PASS iff it names the `ok` of some component."""
    if not is_current(spec, monolithic_spec(spec, match), directory):
        return None
    rt = ExpertRuntime(monolithic_spec(spec, match), directory, device="cpu", image_limits=spec.image)
    rt.load()
    found = [p.label.split("/")[1] for p in predict(rt, images)]  # labels are component/defect
    verdicts = [Verdict.PASS if f == NO_DEFECT else Verdict.DEFECT for f in found]
    n = rt.num_parameters
    return SystemAccuracy(
        verdict_accuracy=float(np.mean([verdict_correct(v, d) for v, (_, d) in zip(verdicts, truth)])),
        defect_accuracy=float(np.mean([defect_correct(v, f, d) for v, f, (_, d) in zip(verdicts, found, truth)])),
        defect_recall=_recall(verdicts, truth), num_uncertain=0, num_images=len(images), mean_experts_per_image=1.0,
        active_parameters_per_image=float(n), total_parameters=n, train_seconds=_train_seconds(directory),
    )


def format_report(r: AccuracyReport) -> str:
    header = (f"Accuracy report: {r.spec}, held-out seed {r.eval_seed}, {r.num_eval_per_pair} images per "
              f"(component, defect) pair, {r.coe.num_images} images")
    missing = [f"\n{name}: not built for this spec; `expertmesh zoo build --only {name_key}` trains it"
               for name, name_key in SYSTEMS[1:] if getattr(r, name_key) is None]
    return f"{header}\n\n{accuracy_tables(r.model_dump())}{''.join(missing)}\nEvaluated in {r.seconds:.1f} s."


def write_report(r: AccuracyReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r.model_dump(), indent=2))
