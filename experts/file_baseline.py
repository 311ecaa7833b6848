"""The matched-parameter monolith of a CoE trained on files: what the CoE is measured against on the user's own data.

One model over every (category, label) of the categories' table experts: it sees an image and names its category
and label at once (`passive/shifted`), with no router. It is sized like the generated-data `monolithic` baseline to
the CoE's active parameters per image (the router plus the experts the category mix calls), trains on exactly the
images the table experts train on (their `train` splits, each image under its category), chooses its epoch on their
`validation` splits, and never sees the `test` images `zoo report` scores both on. Its training settings are the
first table expert's (epochs, batch size, learning rate, augmentation, class weighting).

`expertmesh zoo build` builds it after the experts (as `monolithic`, unless `--no-baseline`; `build_zoo` itself
builds only the experts and the generated-data baselines); `zoo report` scores it beside the CoE, or names it as not
built with the command that builds it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from expertmesh.experts import labeled_data
from expertmesh.experts.architecture_spec import ArchitectureSpec
from expertmesh.experts.file_splits import categorizer, read_splits
from expertmesh.experts.images import resize_to
from expertmesh.experts.spec import CoESpec, ExpertSpec
from expertmesh.experts.training import resolve_plan, train_classifier
from expertmesh.experts.zoo import (RECIPE_VERSION, baseline_architectures, closest_in_parameters, expert_parameters,
                                    expert_seed, read_meta, resolved, save_checkpoint)

NAME = "monolithic"
DIRECTORY = "_baselines/monolithic_files"
SEPARATOR = "/"


def table_experts(spec: CoESpec) -> dict[str, ExpertSpec]:
    """Each category's first table expert (the one that judges it), when it trains on files."""
    out = {}
    for c in spec.categories:
        e = spec.expert(c.experts[0])
        if e.training is not None and e.training.data is not None:
            out[c.name] = e
    return out


def applies(spec: CoESpec) -> bool:
    """Whether the CoE is one this baseline is for: its router and every category's table expert train on files."""
    r = spec.router_expert
    return (r.training is not None and r.training.data is not None
            and len(table_experts(spec)) == len(spec.categories))


def monolith_spec(spec: CoESpec) -> ExpertSpec:
    """The baseline's spec: labels `<category>/<label>`, pass labels likewise, the smallest 3-stage ResNet width
    closest to the CoE's active parameters per image."""
    judges = table_experts(spec)
    labels = [f"{c}{SEPARATOR}{label}" for c, e in judges.items() for label in e.labels]
    passing = [f"{c}{SEPARATOR}{label}" for c, e in judges.items() for label in e.pass_labels]
    params = {e.name: expert_parameters(resolved(spec, e)) for e in spec.experts}
    target = params[spec.router.expert] + sum(c.probability * sum(params[n] for n in c.experts)
                                             for c in spec.categories)
    first = next(iter(judges.values()))
    training = first.training.model_copy(update={"label_map": {}})
    return closest_in_parameters(
        (ExpertSpec(name=NAME, task="classify", architecture=ArchitectureSpec(family="resnet", config=config),
                    checkpoint=DIRECTORY, labels=labels, input_size_px=max(e.input_size_px for e in spec.experts),
                    pass_labels=passing, training=training)
         for config in baseline_architectures(spec, "active")), target)


def fingerprint(spec: CoESpec, mono: ExpertSpec) -> str:
    """The monolith's spec, the seed and every file-data model's data (the router's gives the categories)."""
    data = {e.name: labeled_data.digest(labeled_data.list_data(spec, e)) for e in spec.experts
            if e.training is not None and e.training.data is not None}
    shaped_by = {"expert": mono.model_dump(mode="json", include={"name", "architecture", "input_size_px", "labels",
                                                                   "training"}),
                 "seed": spec.seed, "recipe": RECIPE_VERSION, "data": data,
                 "image": spec.image.model_dump(mode="json"), "baseline": "files-1"}
    return hashlib.sha256(json.dumps(shaped_by, sort_keys=True, default=str).encode()).hexdigest()


def is_current(spec: CoESpec, zoo_root: Path, mono: ExpertSpec | None = None) -> bool:
    """Whether the zoo holds the monolith of this spec and data (`mono`: its spec, when the caller has it)."""
    directory = Path(zoo_root) / DIRECTORY
    meta = read_meta(directory)
    return (meta is not None and meta.get("fingerprint") == fingerprint(spec, mono or monolith_spec(spec))
            and (directory / "model.safetensors").is_file())


def training_arrays(spec: CoESpec, mono: ExpertSpec, splits: dict[str, labeled_data.SplitData]):
    """(x_train, y_train, x_val, y_val, counts) at the monolith's input size: every table expert's images of its
    categories, each on the side its own expert's split put it."""
    size = mono.input_size_px
    category_of = categorizer(spec, splits)
    xs: dict[str, list] = {"train": [], "validation": []}
    ys: dict[str, list] = {"train": [], "validation": []}
    counts: dict[str, dict[str, int]] = {"train": {}, "validation": {}}
    seen: set[str] = set()
    for category, e in table_experts(spec).items():
        d = splits[e.name]
        for r, h, side, img in zip(d.records, d.hashes, d.splits, d.images):
            if side not in xs or h is None or (h, category) in seen:
                continue
            cat = category_of(r, h, e.name)
            if cat != category:
                continue
            seen.add((h, category))
            label = f"{category}{SEPARATOR}{r.label}"
            xs[side].append(resize_to(img, size) if img.shape[0] != size else img)
            ys[side].append(mono.labels.index(label))
            counts[side][label] = counts[side].get(label, 0) + 1
    arr = {s: (np.stack(xs[s]) if xs[s] else np.zeros((0, size, size, 3), dtype=np.uint8)) for s in xs}
    return (arr["train"], np.array(ys["train"], dtype=np.int64), arr["validation"],
            np.array(ys["validation"], dtype=np.int64), counts)


def build(spec: CoESpec, zoo_root: Path, *, device: str = "cpu", progress: bool = True, force: bool = False,
          log=print) -> tuple[str, dict | str | None]:
    """Train the monolith unless it is current: ("trained", its stats), ("current", None), or ("not built", why)
    when the table experts' images say nothing about some (category, label)."""
    mono = monolith_spec(spec)
    directory = Path(zoo_root) / DIRECTORY
    if not force and is_current(spec, zoo_root, mono):
        log(f"up to date, skipped: {NAME} (the files' monolith)")
        return "current", None
    fp = fingerprint(spec, mono)
    t0 = time.perf_counter()
    x, y, x_val, y_val, counts = training_arrays(spec, mono, read_splits(spec, progress=progress))
    missing = [label for i, label in enumerate(mono.labels) if not (y == i).any()]
    if missing:
        why = (f"no training image of {missing} whose category is known (a manifest's category column, the router's "
               "folder for the same file, or an expert that judges one category)")
        log(f"{NAME} (the files' monolith) not built: {why}")
        return "not built", why
    plan = resolve_plan(mono.training)
    weights = labeled_data.class_weights(y, len(mono.labels))[y] if plan.class_weighting == "balanced" else None
    log(f"{NAME}: {len(y)} training and {len(y_val)} validation images over {len(mono.labels)} (category, label) "
        f"classes, sized to the CoE's active parameters per image")
    model, stats = train_classifier(mono, x, y, seed=expert_seed(spec, NAME), device=device, progress=progress,
                                    plan=plan, validation=(x_val, y_val), weights=weights)
    save_checkpoint(model, mono, directory, stats, fp, extra={"data": {"images": counts}})
    log(f"{NAME}: {len(y)} images x {stats.epochs} epochs in {time.perf_counter() - t0:.1f} s, validation accuracy "
        f"{stats.validation_accuracy:.3f} (epoch {stats.best_epoch} kept) -> {directory}")
    return "trained", stats.__dict__
