"""Building the model zoo of a spec: generate data, train each expert, save checkpoints; skip what is current.

A checkpoint directory holds `config.json` + `model.safetensors` (save_pretrained) and
`expertmesh.json`: the fingerprint of everything that shaped the weights (the expert's
architecture, labels, input size and training spec, the seed, the generator and recipe
versions; for an expert trained on files (`training.data`), the files' listing and the image
limits instead of the generator). A checkpoint whose fingerprint matches is skipped; anything
else is retrained. Every stale file-data expert's data is read and checked before any training
starts (`labeled_data.DataError` lists every problem). The zoo also holds monolithic baselines
(one classifier for every (component, defect) pair, trained on the same generated images) for the
accuracy report, when some expert trains on generated images: by default only `monolithic` (about
the CoE's active parameters per image); `monolithic_total` (its total parameters) only when asked
(`baselines=BASELINE_SETS["all"]`, or named in `only`), as the accuracy figure does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from expertmesh.errors import InvalidArgument
from expertmesh.experts import labeled_data
from expertmesh.experts.checkpoint_header import checkpoint_digest
from expertmesh.experts.models import build_model, load_model, num_parameters
from expertmesh.experts.pcb_aoi import dataset, generator
from expertmesh.experts.image_processing import PREPROCESSOR_FILE
from expertmesh.experts.spec import (FILE_DATA_KEYS, ArchitectureSpec, CoESpec, ExpertSpec,
                                     TrainingSpec, pretrained_source, resolve_checkpoint)
from expertmesh.experts.training import resolve_plan, train_classifier

RECIPE_VERSION = "recipe-1"
META_FILE = "expertmesh.json"
BASELINE_DIR = "_baselines/monolithic"  # matched active parameters per image
BASELINE_NAME = "monolithic"
BASELINE_TOTAL_DIR = "_baselines/monolithic_total"  # matched total parameters
BASELINE_TOTAL_NAME = "monolithic_total"
#: baseline name -> (zoo directory, the CoE figure its parameter count matches: "active" or "total")
BASELINES: dict[str, tuple[str, str]] = {BASELINE_NAME: (BASELINE_DIR, "active"),
                                         BASELINE_TOTAL_NAME: (BASELINE_TOTAL_DIR, "total")}
#: `zoo build --baselines` choice -> the baselines built beside the experts. The default (`make run`, `make zoo`)
#: builds the matched-active one only: the matched-total one is for the accuracy comparison and would add about
#: as much training time again.
BASELINE_SETS: dict[str, tuple[str, ...]] = {"none": (), "active": (BASELINE_NAME,), "all": tuple(BASELINES)}
DEFAULT_BASELINES = BASELINE_SETS["active"]
#: The baselines' training budget, the same for both: every image of the experts' training pool (each
#: (component, defect) pair as many images as the expert needing most of it trains on) for this many epochs, with
#: the experts' default augmentation (rot90, hflip), no hold-out, the one-cycle schedule of `training.py`.
BASELINE_EPOCHS = 4


def expert_seed(spec: CoESpec, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{spec.seed}|{name}".encode()).digest()[:4], "little")


def fingerprint(spec: CoESpec, expert: ExpertSpec) -> str:
    dumped = expert.model_dump(include={"name", "architecture", "input_size_px", "labels", "training"})
    if dumped.get("training") is not None:  # keys added for file data count only once set (old fingerprints hold)
        dumped["training"] = {k: v for k, v in dumped["training"].items() if k not in FILE_DATA_KEYS or v is not None}
    # a brought checkpoint counts by its content (below), not where it lies; unset for the built families, so their
    # fingerprints are what they were before pretrained experts
    dumped["architecture"].pop("path", None)
    shaped_by = {"expert": dumped, "seed": spec.seed, "recipe": RECIPE_VERSION}
    source = pretrained_source(spec, expert)
    if source is not None:  # a brought checkpoint: its content, so a changed checkpoint is noticed
        shaped_by["checkpoint"] = checkpoint_digest(source)
    if trains_on_files(expert):
        shaped_by["data"] = labeled_data.digest(labeled_data.list_data(spec, expert))
        shaped_by["image"] = spec.image.model_dump(mode="json")
    else:
        shaped_by["generator"] = generator.GENERATOR_VERSION
    init_from = expert.training.init_from if expert.training else None
    if init_from is not None:  # it starts from another expert's weights: those shape it too
        shaped_by["init_from"] = fingerprint(spec, spec.expert(init_from))
    if expert.name in BASELINES:  # a baseline trains on the whole pool, which the experts shape
        shaped_by["pool"] = sorted(f"{c}/{d}:{n}" for (c, d), n in dataset.train_counts(spec).items())
    return hashlib.sha256(json.dumps(shaped_by, sort_keys=True).encode()).hexdigest()


def resolved(spec: CoESpec, expert: ExpertSpec) -> ExpertSpec:
    """The expert with a pretrained checkpoint's path made absolute (against the spec file), for building it."""
    source = pretrained_source(spec, expert)
    if source is None:
        return expert
    return expert.model_copy(update={"architecture": expert.architecture.model_copy(update={"path": str(source)})})


def starting_point(spec: CoESpec, expert: ExpertSpec, zoo_root: Path) -> ExpertSpec:
    """The expert as training builds it: from its `training.init_from` expert's checkpoint in this zoo (as a local
    pretrained checkpoint, its head replaced when the labels differ), else `resolved`."""
    init_from = expert.training.init_from if expert.training else None
    if init_from is None:
        return resolved(spec, expert)
    source = resolve_checkpoint(spec.expert(init_from), zoo_root)
    if not (source / "model.safetensors").is_file():
        raise InvalidArgument(f"{expert.name!r} starts from {init_from!r} (training.init_from), which is not built in "
                              f"{zoo_root}", field=f"experts.{expert.name}.training.init_from",
                              fix=f"build it first (`expertmesh zoo build --only {init_from}`), or build both")
    return expert.model_copy(update={"architecture": ArchitectureSpec(family="pretrained", path=str(source))})


def build_order(spec: CoESpec, experts: list[ExpertSpec]) -> list[ExpertSpec]:
    """`experts` in spec order, except that an expert comes after the one its `training.init_from` names."""
    names = {e.name for e in experts}
    done: list[ExpertSpec] = []

    def visit(e: ExpertSpec, path: frozenset[str]) -> None:
        if e in done or e.name in path:
            return
        source = e.training.init_from if e.training else None
        if source in names:
            visit(next(x for x in experts if x.name == source), path | {e.name})
        done.append(e)

    for e in experts:
        visit(e, frozenset())
    return done


def trains_on_generated(expert: ExpertSpec) -> bool:
    return expert.training is not None and expert.training.data is None


def trains_on_files(expert: ExpertSpec) -> bool:
    return expert.training is not None and expert.training.data is not None


def read_meta(checkpoint_dir: Path) -> dict | None:
    try:
        return json.loads((checkpoint_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_current(spec: CoESpec, expert: ExpertSpec, checkpoint_dir: Path) -> bool:
    meta = read_meta(checkpoint_dir)
    return (meta is not None and meta.get("fingerprint") == fingerprint(spec, expert)
            and all((checkpoint_dir / f).is_file() for f in ("config.json", "model.safetensors")))


def expert_parameters(expert: ExpertSpec) -> int:
    return num_parameters(build_model(expert, 0))


def heldout_active_parameters(spec: CoESpec) -> float:
    """Expected parameters per image on the accuracy report's held-out mix (every (component, defect) pair
    equally often), every model answering right: the router, its category's experts, and the downstream experts
    their true outputs trigger (gating rules need station metadata the report does not send). What the report
    measures as the CoE's active parameters per image, known before training; the `monolithic` baseline's size."""
    params = {e.name: expert_parameters(resolved(spec, e)) for e in spec.experts}
    truth: dict[str, dict[tuple[str, str], str]] = {}  # per expert reached: its label of each pair it trains on
    table = {c.name: c.experts for c in spec.categories}

    def run(expert: str, pair: tuple[str, str], seen: frozenset[str]) -> int:
        if expert not in truth:
            e = spec.expert(expert)
            truth[expert] = ({(s.component, s.defect): s.label for s in dataset.expert_samples(spec, e)}
                             if trains_on_generated(e) else {})
        label = truth[expert].get(pair)
        return params[expert] + sum(run(d.downstream, pair, seen | {expert}) for d in spec.dependencies
                                    if d.upstream == expert and label in d.on_labels and d.downstream not in seen)

    pairs = generator.all_pairs()
    return sum(params[spec.router.expert] + sum(run(e, pair, frozenset()) for e in table.get(pair[0], []))
               for pair in pairs) / len(pairs)


def total_parameters(spec: CoESpec) -> int:
    """Every expert's parameters (router included): what the CoE holds in memory."""
    return sum(expert_parameters(resolved(spec, e)) for e in spec.experts)


def baseline_training() -> TrainingSpec:
    """How both monolithic baselines train (the same budget rules; see BASELINE_EPOCHS)."""
    return TrainingSpec(target="defect", epochs=BASELINE_EPOCHS)


def baseline_architectures(spec: CoESpec, match: str):
    """Candidate shapes, smallest first. Active: the experts' 3-stage ResNet scaled in width. Total: the active
    baseline's 3 stages as they are, plus a fourth stage (one basic block at 1/32 of the input resolution) scaled
    in width: there parameters grow ~quadratically with width while compute per image stays close to the active
    baseline's, so both baselines train in about the same time (a width-scaled 3-stage ResNet of the total
    parameters would need several times the compute per image)."""
    if match == "active":
        for width in range(8, 129, 2):
            yield {"embedding_size": width, "hidden_sizes": [width, 2 * width, 4 * width], "depths": [1, 1, 1],
                   "layer_type": "basic"}
        return
    base = monolithic_spec(spec, "active").architecture.config
    for width in range(base["hidden_sizes"][-1], 2049, 8):
        yield {**base, "hidden_sizes": [*base["hidden_sizes"], width], "depths": [*base["depths"], 1]}


def monolithic_spec(spec: CoESpec, match: str = "active") -> ExpertSpec:
    """One ResNet over all (component, defect) pairs, at the CoE's largest input size, sized to the CoE's active
    parameters per image on the held-out mix (`match="active"`, the baseline `monolithic`) or to its total parameters (`"total"`,
    `monolithic_total`); both train by `baseline_training()`."""
    name = {m: n for n, (_, m) in BASELINES.items()}[match]
    labels = [f"{c}/{d}" for c, d in generator.all_pairs()]
    target = heldout_active_parameters(spec) if match == "active" else total_parameters(spec)
    return closest_in_parameters(
        (ExpertSpec(name=name, task="classify", architecture=ArchitectureSpec(family="resnet", config=config),
                    checkpoint=BASELINES[name][0], input_size_px=max(e.input_size_px for e in spec.experts),
                    labels=labels, pass_labels=[l for l in labels if l.endswith("/ok")], training=baseline_training())
         for config in baseline_architectures(spec, match)), target)


def closest_in_parameters(candidates: Iterable[ExpertSpec], target: float) -> ExpertSpec:
    """The candidate whose parameter count is closest to `target`; the candidates grow in parameters, so the search
    stops once past the closest (the first of a tie wins)."""
    best = None
    for candidate in candidates:
        gap = abs(expert_parameters(candidate) - target)
        if best is not None and gap > best[0]:
            break  # parameters grow with width: past the closest
        if best is None or gap < best[0]:
            best = (gap, candidate)
    return best[1]


def baseline_specs(spec: CoESpec, names: Collection[str] | None = None) -> list[tuple[ExpertSpec, str]]:
    """The baselines (`names`, default both) with their zoo directories (relative to the zoo root)."""
    return [(monolithic_spec(spec, match), directory) for name, (directory, match) in BASELINES.items()
            if names is None or name in names]


@dataclass
class BuildResult:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stats: dict[str, dict] = field(default_factory=dict)


def _save(model, spec: CoESpec, expert: ExpertSpec, checkpoint_dir: Path, stats, fp: str, data=None) -> None:
    """`fp`: the fingerprint taken before the data was read (a file changed meanwhile leaves the expert stale)."""
    extra: dict = {"generator": generator.GENERATOR_VERSION}
    if data is not None:  # trained on files: where from, and the images per split and label
        extra = {"data": {"source": str(labeled_data.data_path(spec, expert)), "images": data.counts}}
    source = pretrained_source(spec, expert)
    copies = []
    if source is not None:  # brought: where from; its preprocessing goes with it (serving and profiling read it)
        extra["pretrained"] = str(source)
        if stats is None:
            extra["generator"] = None
        if (source / PREPROCESSOR_FILE).is_file():
            copies.append(source / PREPROCESSOR_FILE)
    save_checkpoint(model, expert, checkpoint_dir, stats, fp, extra=extra, copies=copies)


def save_checkpoint(model, expert: ExpertSpec, checkpoint_dir: Path, stats, fp: str, *, extra: dict | None = None,
                     copies: list[Path] = ()) -> None:
    """The checkpoint directory, written whole or not at all: weights, config, `copies`, and META_FILE (the
    fingerprint, labels, training stats and `extra`)."""
    tmp = checkpoint_dir.with_name(checkpoint_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    meta = {
        "expert": expert.name, "fingerprint": fp, "labels": list(expert.labels),
        "input_size_px": expert.input_size_px, "num_parameters": num_parameters(model),
        "train": stats.__dict__ if stats is not None else None, "torch": torch.__version__, "transformers": transformers.__version__,
        "recipe": RECIPE_VERSION, **(extra or {}),
    }
    for path in copies:
        shutil.copyfile(path, tmp / path.name)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(checkpoint_dir)


def build_zoo(spec: CoESpec, zoo_root: Path, *, only: list[str] | None = None, force: bool = False,
              baselines: Collection[str] = DEFAULT_BASELINES, device: str = "cpu", progress: bool = True,
              log=print) -> BuildResult:
    """Train every expert (and the `baselines`) whose checkpoint is missing or stale; returns what was done. With
    `only`, just the experts and baselines it names (a baseline named there is built whatever `baselines` says)."""
    t0 = time.perf_counter()
    zoo_root = Path(zoo_root)
    result = BuildResult()
    if set(baselines) - set(BASELINES):
        raise InvalidArgument(f"unknown baselines {sorted(set(baselines) - set(BASELINES))}", field="--baselines",
                              fix=f"use names from {sorted(BASELINES)}")
    targets = build_order(spec, [e for e in spec.experts if only is None or e.name in only])
    unknown = sorted(set(only or []) - {e.name for e in spec.experts} - set(BASELINES))
    if unknown:
        raise InvalidArgument(f"unknown experts {unknown}", field="--only", fix=f"use names from the spec: {[e.name for e in spec.experts]}")
    jobs: list[tuple[ExpertSpec, Path]] = [(e, resolve_checkpoint(e, zoo_root)) for e in targets]
    wanted = set(baselines) if only is None else set(only) & set(BASELINES)
    if wanted and any(trains_on_generated(e) for e in spec.experts):
        jobs += [(mono, zoo_root / directory) for mono, directory in baseline_specs(spec, wanted)]
    stale = []
    for e, ckpt in jobs:
        if not force and is_current(spec, e, ckpt):
            result.skipped.append(e.name)
        else:
            stale.append((e, ckpt))
    if result.skipped:
        log(f"up to date, skipped: {', '.join(result.skipped)}")
    if not stale:
        result.seconds = time.perf_counter() - t0
        return result

    fps = {e.name: fingerprint(spec, e) for e, _ in stale}  # before the data is read
    files = _read_file_data(spec, [e for e, _ in stale if trains_on_files(e)], progress, log)  # raises DataError
    generated = [e for e, _ in stale if e.training is not None and not trains_on_files(e)]
    pool_counts = dataset.train_counts(spec) if generated else {}
    needed: dict[tuple[str, str], int] = {}
    for e in generated:
        counts = pool_counts if e.name in BASELINES else dataset.per_pair_counts(spec, e)
        for pair, n in counts.items():
            needed[pair] = max(needed.get(pair, 0), n)
    log(f"training {len(stale)} model(s): {', '.join(e.name for e, _ in stale)}")
    pool = dataset.Pool.generate(needed, spec.seed, desc="generating training images", progress=progress) if needed else None

    for i, (e, ckpt) in enumerate(stale, 1):
        seed = expert_seed(spec, e.name)
        if e.training is None and pretrained_source(spec, e) is not None:  # brought, used as is: imported
            model = load_model(e, pretrained_source(spec, e)).to(torch.float32)
            _save(model, spec, e, ckpt, None, fps[e.name])
            result.trained.append(e.name)
            log(f"[{i}/{len(stale)}] {e.name}: imported as is from {pretrained_source(spec, e)}, "
                f"{num_parameters(model):,} parameters -> {ckpt}")
            continue
        plan = resolve_plan(e.training)
        if trains_on_files(e):
            d = files[e.name]
            x, y, val = d.x_train, d.y_train, (d.x_val, d.y_val)
            weights = d.w_train * (labeled_data.class_weights(y, len(e.labels))[y]
                                   if plan.class_weighting == "balanced" else 1.0)
        else:
            if e.name in BASELINES:
                samples = [dataset.Sample(c, d, f"{c}/{d}") for c, d in generator.all_pairs()]
                x, y = pool.arrays_for(samples, e.labels, counts=pool_counts)
            else:
                x, y = pool.arrays_for(dataset.expert_samples(spec, e), e.labels, counts=dataset.per_pair_counts(spec, e))
            x, y, val, weights = _generated_split(x, y, plan, seed, len(e.labels))
        model, stats = train_classifier(starting_point(spec, e, zoo_root), x, y, seed=seed, device=device, progress=progress, plan=plan,
                                        validation=val, weights=weights)
        _save(model, spec, e, ckpt, stats, fps[e.name], files.get(e.name))
        result.trained.append(e.name)
        result.stats[e.name] = stats.__dict__
        val_note = (f", validation accuracy {stats.validation_accuracy:.3f}, balanced "
                    f"{stats.validation_balanced_accuracy:.3f} ({stats.num_validation} images, epoch {stats.best_epoch} "
                    "kept)" if stats.validation_accuracy is not None else "")
        log(f"[{i}/{len(stale)}] {e.name}: {stats.num_images} images x {stats.epochs} epochs in {stats.seconds:.1f} s, "
            f"train accuracy {stats.train_accuracy:.3f}{val_note}, {num_parameters(model):,} parameters -> {ckpt}")
    result.seconds = time.perf_counter() - t0
    return result


def _read_file_data(spec: CoESpec, experts: list[ExpertSpec], progress: bool, log) -> dict[str, labeled_data.TrainingData]:
    """Every file-data expert's images, decoded and checked; one DataError with every problem of every expert."""
    out, problems = {}, []
    for e in experts:
        plan = resolve_plan(e.training)
        data, found = labeled_data.prepare(spec, e, progress=progress, validation_fraction=plan.validation_fraction,
                                           test_fraction=plan.test_fraction)
        problems += [labeled_data.DataProblem(p.file, f"[{e.name}] {p.message}", p.fix) for p in found]
        if data is not None:
            out[e.name] = data
            num_test = sum(data.counts["test"].values())
            log(f"{e.name}: {len(data.y_train)} training, {len(data.y_val)} validation and {num_test} test images "
                f"from {labeled_data.data_path(spec, e)}")
    if problems:
        raise labeled_data.DataError(problems)
    return out


def _generated_split(x, y, plan, seed: int, num_labels: int):
    """Generated data: all of it trains unless the spec asks for a validation fraction or class weighting."""
    val = weights = None
    if plan.validation_fraction > 0:
        keys = [str(i) for i in range(len(y))]  # generated images are all distinct
        splits = labeled_data.assign_splits([str(v) for v in y], keys, [None] * len(y), plan.validation_fraction, seed)
        tr = [s == "train" for s in splits]
        va = [s == "validation" for s in splits]
        x, y, val = x[tr], y[tr], (x[va], y[va])
    if plan.class_weighting == "balanced":
        weights = labeled_data.class_weights(y, num_labels)[y]
    return x, y, val, weights
