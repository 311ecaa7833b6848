"""Held-out images of a CoE whose router trains on labeled files: what `zoo report` and `zoo calibrate` measure on.

Every file-data model's data is listed, decoded and split exactly as `zoo build` split it (`labeled_data.split_data`:
seeded by the spec's seed and each image's content, so the models hold out nearly the same images).

`split` is the held-out side scored: `test` for the report (carved from the data, seeded and stratified, unless a
manifest marks its own rows test: never trained on, never used to stop training or to calibrate), `validation` for
`zoo calibrate`.

* **Each expert alone** is scored on its own images of that side, the router on its own split's categories.
* **The whole CoE** is scored on the images of that side of every file-data expert (the table's first, then the
  others, e.g. a fallback trained on everything) that are held out from *every* model (for test: their content is
  in no model's train or validation split; for validation: in no model's train split), each image once: its
  category is its manifest row's `category`, else the router's label for the same file (by content), else the one
  category whose table sends to that expert; its truth is DEFECT unless its label is one of that expert's
  `pass_labels`. Images whose category cannot be told are left out (`num_unplaced`). The set does not depend on
  the table, so a spec and its calibrated version are scored on the same images (as long as the experts whose data
  hold them stay in the spec).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expertmesh.errors import InvalidArgument
from expertmesh.experts import file_baseline, labeled_data
from expertmesh.experts.accuracy_tables import accuracy_tables
from expertmesh.experts.images import resize_to
from expertmesh.experts.line_figures import line_figures
from expertmesh.experts.offline import load_runtime, predict, run_coe
from expertmesh.experts.runtime import ExpertRuntime
from expertmesh.experts.pcb_aoi.truth import NO_DEFECT, defect_correct, verdict_correct
from expertmesh.experts.report import AccuracyReport, ExpertAccuracy, SystemAccuracy
from expertmesh.experts.spec import CoESpec, ExpertSpec, resolve_checkpoint
from expertmesh.experts.file_splits import categorizer, has_split, read_splits  # noqa: F401 (re-exported)
from expertmesh.experts.zoo import read_meta
from expertmesh.router.plan import Verdict, aggregate


def trains_on_files(expert: ExpertSpec) -> bool:
    return expert.training is not None and expert.training.data is not None


def router_on_files(spec: CoESpec) -> bool:
    """Whether the CoE's categories come from labeled files (the router trains on them): then its report and its
    calibration measure on those files' held-out images, not on generated ones."""
    return trains_on_files(spec.router_expert)


@dataclass
class ExpertHeldOut:
    """One model's own held-out images at its input size, with integer labels."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class HeldOut:
    """The CoE's held-out images at the spec's largest input size, each with its category, label and truth."""

    split: str
    images: np.ndarray
    categories: list[str]
    labels: list[str]  # in the vocabulary of the expert whose data held the image
    raw_labels: list[str]  # before that expert's label_map (the folder name or manifest label)
    is_defect: list[bool]
    per_expert: dict[str, ExpertHeldOut] = field(default_factory=dict)
    num_unplaced: int = 0


def held_out(spec: CoESpec, splits: dict[str, labeled_data.SplitData], split: str = "validation") -> HeldOut:
    """The held-out images (module doc) from the models' splits."""
    size = max(spec.input_sizes_px)
    # validation images were seen by no model's weights; test images neither by any model's early stopping
    seen_sides = {"train"} if split == "validation" else {"train", "validation"}
    trained = {h for d in splits.values() for h, s in zip(d.hashes, d.splits) if s in seen_sides and h is not None}
    per_expert = {}
    for name, d in splits.items():
        e = spec.expert(name)
        keep = [i for i, s in enumerate(d.splits) if s == split]
        per_expert[name] = ExpertHeldOut(d.images[keep], np.array([e.labels.index(d.records[i].label) for i in keep],
                                                                  dtype=np.int64))
    category = categorizer(spec, splits)
    names = [n for c in spec.categories for n in c.experts] + [e.name for e in spec.experts]
    names = [n for i, n in enumerate(names) if n in splits and n != spec.router.expert and n not in names[:i]]
    known = {c.name for c in spec.categories}
    seen: set[str] = set()
    unplaced: set[str] = set()
    images, cats, labels, raw, defects = [], [], [], [], []
    for name in names:
        d, e = splits[name], spec.expert(name)
        for r, h, s, img in zip(d.records, d.hashes, d.splits, d.images):
            if s != split or h is None or h in trained or h in seen:
                continue
            cat = category(r, h, name)
            if cat not in known:
                unplaced.add(h)
                continue
            seen.add(h)
            unplaced.discard(h)
            images.append(resize_to(img, size) if img.shape[0] != size else img)
            cats.append(cat)
            labels.append(r.label)
            raw.append(r.raw_label or r.label)
            defects.append(r.label not in e.pass_labels)
    arr = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
    return HeldOut(split, arr, cats, labels, raw, defects, per_expert, len(unplaced))


def judges(expert: ExpertSpec, labels: set[str]) -> bool:
    """Whether `expert` can judge images with these labels: a classify expert with pass_labels that knows each of
    them (as one of its labels, or as a key of its training.label_map)."""
    if expert.task != "classify" or not expert.pass_labels:
        return False
    known = set(expert.labels) | set(expert.training.label_map if expert.training else {})
    return labels <= known


def candidate_options(spec: CoESpec, held: HeldOut) -> dict[str, list[tuple[str, ...]]]:
    """Per category: every single expert that `judges` the (raw) labels of its held-out images, then the current
    entry."""
    out = {}
    for c in spec.categories:
        labels = {lab for lab, cat in zip(held.raw_labels, held.categories) if cat == c.name}
        opts = [(e.name,) for e in spec.experts if labels and judges(e, labels)]
        if tuple(c.experts) not in opts:
            opts.append(tuple(c.experts))
        out[c.name] = opts
    return out


# --------------------------------------------------------------------------- the accuracy report
class FileAccuracyReport(AccuracyReport):
    """`zoo report` of a CoE trained on files: eval_seed is the split seed (the spec's), num_eval_per_pair 0."""

    split: str
    num_unplaced: int


def evaluate(spec: CoESpec, zoo_root: Path, *, progress: bool = True, split: str | None = None) -> FileAccuracyReport:
    """Each model on its own held-out split, and the whole CoE as serving runs it on the images held out from every
    model (`split`: default `test` - carved from the data, or the rows a manifest marks test - when there is one,
    else `validation`)."""
    t0 = time.perf_counter()
    splits = read_splits(spec, progress=progress)
    split = split or ("test" if has_split(splits, "test") else "validation")
    held = held_out(spec, splits, split)
    if not len(held.images):
        raise InvalidArgument(f"no image is held out from every model in the {split!r} split, so the CoE cannot be "
                              "scored", field="experts[*].training.validation_fraction",
                              fix="give the models a test_fraction and validation_fraction > 0 (default 0.2 "
                                  "each), or mark rows split: test in a manifest")
    runtimes = {e.name: load_runtime(spec, e, zoo_root) for e in spec.experts}
    params = {name: rt.num_parameters for name, rt in runtimes.items()}
    per_expert = []
    for e in spec.experts:
        own = held.per_expert.get(e.name)
        if own is None or not len(own.y):  # not trained on files, or nothing held out
            continue
        preds = predict(runtimes[e.name], own.x)
        per_expert.append(ExpertAccuracy(expert=e.name, accuracy=float(np.mean([e.labels.index(p.label) == t for p, t
                                                                                in zip(preds, own.y)])),
                                         num_images=len(own.y), num_parameters=params[e.name],
                                         train_seconds=((read_meta(resolve_checkpoint(e, zoo_root)) or {}).get("train")
                                                        or {}).get("seconds")))
    runs = run_coe(spec, runtimes, held.images)
    outcomes = [aggregate(spec, r.outputs) for r in runs]
    truth = [lab if d else NO_DEFECT for lab, d in zip(held.labels, held.is_defect)]
    used = [sum(params[o.expert] for o in r.outputs) + params[spec.router.expert] for r in runs]
    coe = SystemAccuracy(
        verdict_accuracy=float(np.mean([verdict_correct(o.verdict, t) for o, t in zip(outcomes, truth)])),
        defect_accuracy=float(np.mean([defect_correct(o.verdict, o.defect, t) for o, t in zip(outcomes, truth)])),
        defect_recall=float(np.mean([o.verdict is Verdict.DEFECT for o, d in zip(outcomes, held.is_defect) if d]))
        if any(held.is_defect) else 1.0,
        num_uncertain=sum(o.verdict is Verdict.UNCERTAIN for o in outcomes), num_images=len(runs),
        mean_experts_per_image=float(np.mean([len(r.outputs) + 1 for r in runs])),
        active_parameters_per_image=float(np.mean(used)), total_parameters=sum(params.values()),
        **line_figures([o.verdict for o in outcomes], held.is_defect))
    router_own = held.per_expert.get(spec.router.expert)
    router_acc = (float(np.mean([spec.router_expert.labels.index(p.label) == t for p, t in
                                 zip(predict(runtimes[spec.router.expert], router_own.x), router_own.y)]))
                  if router_own is not None and len(router_own.y) else float("nan"))
    return FileAccuracyReport(spec=spec.name, eval_seed=spec.seed, num_eval_per_pair=0, router_accuracy=router_acc,
                              experts=per_expert, coe=coe, monolithic=monolith_accuracy(spec, zoo_root, held),
                              seconds=time.perf_counter() - t0,
                              split=split, num_unplaced=held.num_unplaced)


def monolith_accuracy(spec: CoESpec, zoo_root: Path, held: HeldOut) -> SystemAccuracy | None:
    """The files' monolith (`experts/file_baseline.py`) on the CoE's held-out images, or None when it is not built
    (or not current): PASS iff it names a pass label; the defect right iff it names the image's own label."""
    if not file_baseline.applies(spec):
        return None
    mono = file_baseline.monolith_spec(spec)  # at the spec's largest input size: the held-out images' size
    if not file_baseline.is_current(spec, zoo_root, mono):
        return None
    rt = ExpertRuntime(mono, Path(zoo_root) / file_baseline.DIRECTORY, device="cpu", image_limits=spec.image)
    rt.load()
    found = [p.label.split(file_baseline.SEPARATOR, 1)[1] for p in predict(rt, held.images)]
    passing = {p.split(file_baseline.SEPARATOR, 1)[1] for p in mono.pass_labels}
    verdicts = [Verdict.PASS if f in passing else Verdict.DEFECT for f in found]
    right_verdict = [(v is Verdict.DEFECT) == d for v, d in zip(verdicts, held.is_defect)]
    n = rt.num_parameters
    return SystemAccuracy(
        verdict_accuracy=float(np.mean(right_verdict)),
        defect_accuracy=float(np.mean([f == lab for f, lab in zip(found, held.labels)])),
        defect_recall=float(np.mean([v is Verdict.DEFECT for v, d in zip(verdicts, held.is_defect) if d]))
        if any(held.is_defect) else 1.0,
        num_uncertain=0, num_images=len(found), mean_experts_per_image=1.0, active_parameters_per_image=float(n),
        total_parameters=n, train_seconds=((read_meta(Path(zoo_root) / file_baseline.DIRECTORY) or {}).get("train")
                                           or {}).get("seconds"),
        **line_figures(verdicts, held.is_defect))


def format_report(r: FileAccuracyReport) -> str:
    header = (f"Accuracy report: {r.spec}, trained on files; each model on its own {r.split} split, the CoE on the "
              f"{r.coe.num_images} {r.split} images no model trained on"
              + (" or stopped on" if r.split == "test" else " (they chose the epochs: the figures flatter)")
              + (f" ({r.num_unplaced} more left out: no category known)" if r.num_unplaced else ""))
    missing = ("" if r.monolithic is not None else f"\n{file_baseline.NAME}: not built for this spec (the matched-"
               f"parameter monolith over every category and label); `expertmesh zoo build --only "
               f"{file_baseline.NAME}` trains it")
    return f"{header}\n\n{accuracy_tables(r.model_dump())}{missing}\nEvaluated in {r.seconds:.1f} s."
