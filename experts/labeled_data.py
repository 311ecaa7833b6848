"""Training data from labeled image files: a folder `<root>/<label>/*` or a manifest (CSV or JSON lines).

The steps, each pure except where it reads the disk:

1. `list_data` reads the folder tree or the manifest (names and `stat` only, no pixels) into `Record`s plus the
   problems found so far (a missing folder, an empty one, a bad manifest row, a label the expert does not have).
   `digest` turns a listing into what the checkpoint fingerprint hashes: sorted (relative path, size, mtime_ns,
   label, split, weight), so changing, adding, removing or relabeling a file makes the expert stale.
2. `read_images` decodes every file exactly as the ingress does (`experts.images.decode_image` with the spec's
   `ImageLimits`, then `resize_to` the expert's input size), hashing its bytes; a file that is unreadable or that
   the ingress would refuse is a problem naming the file and the fix.
3. `assign_splits` gives every row without a manifest `split` a seeded, label-stratified train/validation/test side
   (identical files, by content hash, always land on the same side; test is carved only when no row is marked
   test). Training sees train; early stopping and calibration validation; the report test. In a zoo the seed is the spec's and each
   label's images are ordered by a hash of (seed, content), the same order for every model: the router and the
   experts hold out (nearly) the same images, so the CoE can be scored on images none of its models trained on
   (`experts/file_eval.py`).
4. `check_data` finds what is wrong with the whole set: a label with no (training) images, the same image in the
   train split and a held-out one, the same image under two labels.

`prepare` runs them for one expert and returns the arrays to train on, or the problems; `build_zoo` prepares every
stale expert first and raises one `DataError` listing every problem before any training starts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from expertmesh.errors import ExpertMeshError, InvalidArgument
from expertmesh.experts.images import decode_image, resize_to
from expertmesh.experts.spec import CoESpec, ExpertSpec, ImageLimits

DATA_FORMAT_VERSION = "labeled-data-3"  # 2: splits ordered by (spec seed, content); 3: a test split carved first
SPLITS = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation", "test": "test"}
MANIFEST_COLUMNS = ("path", "label", "category", "split", "weight")
_CSV_SUFFIXES = (".csv",)
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_SHOW = 3  # files named per grouped problem


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with an expert's training data: the file (or folder, or manifest line), what, and the fix."""

    file: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}; fix: {self.fix}"


class DataError(InvalidArgument):
    """Training data that cannot be used; `problems` lists every fault found, for every expert, not just the first."""

    MAX_SHOWN = 60

    def __init__(self, problems: list[DataProblem]) -> None:
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) in the training data; nothing was trained",
                         fix="fix each file listed, then run `expertmesh zoo build` again")

    def __str__(self) -> str:
        lines = [self.message] + [f"  - {p}" for p in self.problems[: self.MAX_SHOWN]]
        if len(self.problems) > self.MAX_SHOWN:
            lines.append(f"  ... and {len(self.problems) - self.MAX_SHOWN} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class Record:
    """One labeled image file. `where` names it in problems (the path, or the manifest and line)."""

    path: Path
    rel: str
    label: str
    split: str | None = None
    weight: float = 1.0
    where: str = ""
    category: str | None = None  # a manifest row's category column (None: a folder, or no such column)
    raw_label: str | None = None  # the folder name or manifest label before training.label_map


@dataclass
class Listing:
    source: str
    records: list[Record] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)


@dataclass
class TrainingData:
    """An expert's decoded images at its input size, integer labels, per-image weights, and the split sizes."""

    x_train: np.ndarray
    y_train: np.ndarray
    w_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    counts: dict[str, dict[str, int]]


# --------------------------------------------------------------------------- 1. listing
def data_path(spec: CoESpec, expert: ExpertSpec) -> Path:
    d = expert.training.data
    p = Path(d.folder if d.folder is not None else d.manifest)
    return p if p.is_absolute() else spec.base_dir / p


def label_field(expert: ExpertSpec) -> str:
    d = expert.training.data
    return d.label_field or ("category" if expert.task == "route" else "label")


def list_data(spec: CoESpec, expert: ExpertSpec) -> Listing:
    """The expert's labeled files (no pixels read) and the problems visible without reading them."""
    path = data_path(spec, expert)
    if expert.training.data.folder is not None:
        listing = list_folder(path, expert.labels, expert.training.label_map)
    else:
        listing = read_manifest(path, expert.labels, expert.training.label_map, label_field(expert),
                                expert.training.data.categories)
    return listing


def _unknown_label(label: str, where: list[str], labels: list[str], how: str, n: int | None = None) -> DataProblem:
    shown = ", ".join(where[:_SHOW]) + (f" and {len(where) - _SHOW} more" if len(where) > _SHOW else "")
    n = len(where) if n is None else n
    return DataProblem(shown, f"label {label!r} ({n} image(s)) is not one of the expert's labels {labels}",
                       f"{how}, add {label!r} to the expert's labels, or map it in training.label_map")


def list_folder(root: Path, labels: list[str], label_map: dict[str, str]) -> Listing:
    """`<root>/<label>/**` (hidden files skipped; files directly under root ignored: they are no label's)."""
    out = Listing(str(root))
    if not root.is_dir():
        out.problems.append(DataProblem(str(root), "training.data.folder does not exist or is not a folder",
                                        "fix the path (relative to the spec file) or create the folder"))
        return out
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for sub in subdirs:
        label = label_map.get(sub.name, sub.name)
        files = sorted(f for f in sub.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(sub).parts))
        if label not in labels:
            out.problems.append(_unknown_label(label, [f"{sub}/"], labels, f"rename folder {sub.name!r} to one of "
                                                                           f"{labels}, remove it", n=len(files)))
            continue
        out.records += [Record(f, f.relative_to(root).as_posix(), label, where=str(f), raw_label=sub.name)
                        for f in files]
    if not subdirs or not any(f.is_file() for s in subdirs for f in s.rglob("*")):
        out.problems.append(DataProblem(str(root), "the folder holds no images (expected <folder>/<label>/<image>)",
                                        f"put each image in the sub-folder named by its label, one of {labels}"))
    return out


def _manifest_rows(path: Path, out: Listing) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV (header row first) or JSON-lines manifest; problems go to `out`."""
    rows: list[tuple[int, dict]] = []
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in _CSV_SUFFIXES:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            out.problems.append(DataProblem(str(path), f"the CSV header {reader.fieldnames} has no 'path' column",
                                            f"start the file with a header row naming its columns: {list(MANIFEST_COLUMNS)}"))
            return rows
        for row in reader:
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}))
        return rows
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            out.problems.append(DataProblem(f"{path}:{i}", f"not valid JSON ({exc.msg})",
                                            'write one JSON object per line: {"path": ..., "label": ...}'))
            continue
        if not isinstance(row, dict):
            out.problems.append(DataProblem(f"{path}:{i}", f"a JSON {type(row).__name__}, not an object",
                                            'write one JSON object per line: {"path": ..., "label": ...}'))
            continue
        rows.append((i, {k: "" if v is None else v for k, v in row.items()}))
    return rows


def read_manifest(path: Path, labels: list[str], label_map: dict[str, str], label_column: str = "label",
                  categories: list[str] | None = None) -> Listing:
    """Rows of path, label and optionally category, split, weight; paths relative to the manifest's folder.
    Other columns are ignored. Rows whose category is not in `categories` (when given) are skipped."""
    out = Listing(str(path))
    suffix = path.suffix.lower()
    if suffix not in _CSV_SUFFIXES + _JSONL_SUFFIXES:
        out.problems.append(DataProblem(str(path), f"manifest suffix {suffix!r} is neither CSV nor JSON lines",
                                        "name it .csv (header row: path,label,...) or .jsonl (one JSON object a line)"))
        return out
    if not path.is_file():
        out.problems.append(DataProblem(str(path), "training.data.manifest does not exist",
                                        "fix the path (relative to the spec file) or write the manifest"))
        return out
    unknown: dict[str, list[str]] = defaultdict(list)
    for line, row in _manifest_rows(path, out):
        where = f"{path}:{line}"
        if categories is not None and str(row.get("category", "")) not in categories:
            continue
        rel, raw = str(row.get("path", "")), str(row.get(label_column, ""))
        if not rel:
            out.problems.append(DataProblem(where, "row has no path", "give the image's path, relative to the manifest"))
            continue
        file = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        where = f"{where} ({rel})"
        bad = False
        if not file.is_file():
            out.problems.append(DataProblem(where, f"no file at {str(file)!r}",
                                            "correct the path (relative to the manifest's folder) or remove the row"))
            bad = True
        if not raw:
            out.problems.append(DataProblem(where, f"row has no {label_column}",
                                            f"give the {label_column} of the image, one of {labels}"))
            bad = True
        split = str(row.get("split", "")).strip().lower() or None
        if split is not None and split not in SPLITS:
            out.problems.append(DataProblem(where, f"split {row['split']!r} is not one of {sorted(SPLITS)}",
                                            "use train, validation (val) or test, or leave it empty for a seeded split"))
            bad = True
        weight = 1.0
        if str(row.get("weight", "")).strip() != "":
            try:
                weight = float(row["weight"])
                ok = math.isfinite(weight) and weight > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                out.problems.append(DataProblem(where, f"weight {row['weight']!r} is not a positive number",
                                                "give a number > 0 (1 = normal), or leave it empty"))
                bad = True
        if not raw:
            continue
        label = label_map.get(raw, raw)
        if label not in labels:
            unknown[label].append(where)
            continue
        if not bad:
            out.records.append(Record(file, rel, label, SPLITS[split] if split else None, weight, where,
                                      str(row.get("category", "")).strip() or None, raw))
    out.problems += [_unknown_label(lab, wh, labels, "correct the rows' label") for lab, wh in sorted(unknown.items())]
    if not out.records and not out.problems:
        out.problems.append(DataProblem(str(path), "the manifest lists no images" + (
            f" of categories {categories}" if categories is not None else ""), "add one row per labeled image"))
    return out


def digest(listing: Listing) -> list:
    """What the fingerprint hashes: each file's relative path, size, mtime_ns, label, split and weight, sorted;
    and the listing's problems (so data that does not list cleanly is never current)."""
    rows = []
    for r in listing.records:
        try:
            st = r.path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = -1
        rows.append([r.rel, size, mtime, r.label, r.split, r.weight])
    return [DATA_FORMAT_VERSION, sorted(rows, key=lambda x: [str(v) for v in x]), sorted(map(str, listing.problems))]


# --------------------------------------------------------------------------- 2. decoding
def read_images(records: list[Record], limits: ImageLimits, size_px: int, *, desc: str = "reading images",
                progress: bool = True) -> tuple[np.ndarray, list[str | None], list[DataProblem]]:
    """Every file decoded as the ingress decodes it and resized to `size_px`: uint8 [N, size, size, 3] (zeros
    where a file failed), the sha256 of each file's bytes (None where unreadable), and a problem per bad file."""
    images = np.zeros((len(records), size_px, size_px, 3), dtype=np.uint8)
    hashes: list[str | None] = []
    problems: list[DataProblem] = []
    for i, r in enumerate(tqdm(records, desc=desc, unit="img", disable=not progress, leave=False)):
        try:
            data = r.path.read_bytes()
        except OSError as exc:
            problems.append(DataProblem(r.where, f"cannot read the file ({exc.strerror or type(exc).__name__})",
                                        "make it readable or remove it"))
            hashes.append(None)
            continue
        hashes.append(hashlib.sha256(data).hexdigest())
        try:
            images[i] = resize_to(decode_image(data, limits, field=r.rel), size_px)
        except ExpertMeshError as exc:
            fix = (exc.fix or "re-encode it as PNG or JPEG").removeprefix("send ")  # the ingress's fix is a client's
            problems.append(DataProblem(r.where, f"the ingress would refuse it: {exc.message}",
                                        f"make it {fix}, or remove it" if fix != exc.fix else f"{fix}, or remove it"))
    return images, hashes, problems


def manifest_rows(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) of every row of a CSV or JSON-lines manifest, and the problems reading it (as text)."""
    out = Listing(str(path))
    rows = _manifest_rows(path, out)
    return rows, [str(p) for p in out.problems]


# --------------------------------------------------------------------------- 3. splitting
def assign_splits(labels: list[str], hashes: list[str | None], given: list[str | None], fraction: float,
                  seed: int, *, by_content: bool = False, test_fraction: float = 0.0) -> list[str]:
    """Each row's split: the given one, else seeded and stratified by label: `test_fraction` of each label's distinct
    images (by content hash) to test, `fraction` to validation - each at least one when the fraction is above 0
    and the label has enough images, never leaving the label without a training image.

    `by_content`: each label's images are ordered by sha256(seed, content hash) and the first ones held out (test
    first, then validation), so models that share images and a seed hold out the same ones however they label them
    (else a permutation seeded by (seed, label): what generated data uses)."""
    out: list[str] = [g or "" for g in given]
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (label, h, g) in enumerate(zip(labels, hashes, given)):
        if g is None:
            groups[label][h or f"unreadable-{i}"].append(i)
    for label, by_hash in groups.items():
        keys = sorted(by_hash)
        n_test = _held_out_count(test_fraction, len(keys), len(keys) - 1)
        n_val = _held_out_count(fraction, len(keys), len(keys) - 1 - n_test)
        if by_content:
            order = sorted(range(len(keys)), key=lambda j: hashlib.sha256(f"{seed}|{keys[j]}".encode()).digest())
        else:
            rng_seed = int.from_bytes(hashlib.sha256(f"{seed}|{label}".encode()).digest()[:8], "little")
            order = np.random.default_rng(rng_seed).permutation(len(keys)).tolist()
        side = {j: "test" for j in order[:n_test]}
        side.update({j: "validation" for j in order[n_test:n_test + n_val]})
        for j, key in enumerate(keys):
            for i in by_hash[key]:
                out[i] = side.get(j, "train")
    return out


def _held_out_count(fraction: float, n: int, room: int) -> int:
    """round(fraction * n), at least 1 when fraction > 0, at most `room` (what is left beside one training image)."""
    if fraction <= 0 or room <= 0:
        return 0
    return min(max(1, round(fraction * n)), room)


# --------------------------------------------------------------------------- 4. whole-set checks
def check_data(labels: list[str], records: list[Record], hashes: list[str | None], splits: list[str],
               source: str, how_to_add: str) -> list[DataProblem]:
    """Problems of the set as a whole (pure): labels with no images or no training images, one image in both the
    train and validation splits, one image under two labels."""
    problems: list[DataProblem] = []
    for label in labels:
        n_all = sum(1 for r in records if r.label == label)
        n_train = sum(1 for r, s in zip(records, splits) if r.label == label and s == "train")
        if n_all == 0:
            problems.append(DataProblem(source, f"label {label!r} has no images (an empty class)",
                                        f"{how_to_add.format(label=label)}, or remove {label!r} from the labels"))
        elif n_train == 0:
            problems.append(DataProblem(source, f"label {label!r} has {n_all} image(s) but none in the train split",
                                        f"give some of them split train (or no split), or add more images of {label!r}"))
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        if h is not None:
            by_hash[h].append(i)
    for idx in by_hash.values():
        if len(idx) < 2:
            continue
        first = {}
        for i in idx:
            first.setdefault(records[i].label, i)
        if len(first) > 1:
            a, b = list(first.values())[:2]
            problems.append(DataProblem(records[a].where, f"the same image as {records[b].where} but labeled "
                                        f"{records[a].label!r} there {records[b].label!r}",
                                        "keep one copy, under its right label"))
            continue
        sides = {}
        for i in idx:
            sides.setdefault(splits[i], i)
        for held in ("validation", "test"):
            if "train" in sides and held in sides:
                a, b = sides["train"], sides[held]
                problems.append(DataProblem(records[a].where, f"the same image as {records[b].where}, in the train "
                                            f"split here and the {held} split there (the {held} figures would "
                                            "flatter the model)", "remove one copy, or give both the same split"))
    return problems


# --------------------------------------------------------------------------- one expert
@dataclass
class SplitData:
    """An expert's files as `zoo build` splits them: records, images at its input size, content hashes, splits."""

    records: list[Record]
    images: np.ndarray
    hashes: list[str | None]
    splits: list[str]


def split_data(spec: CoESpec, expert: ExpertSpec, *, validation_fraction: float, test_fraction: float = 0.0,
               progress: bool = True) -> tuple[SplitData, list[DataProblem]]:
    """List, decode, split (seeded by the spec's seed, by content: `assign_splits`) and check `expert`'s data.

    A test split is carved (`test_fraction` of each label) only when no manifest row of this data is marked test:
    the user's own test rows are the test split then."""
    listing = list_data(spec, expert)
    folder = expert.training.data.folder is not None
    how_to_add = (f"add images under {listing.source}/{{label}}/" if folder
                  else f"add rows with {label_field(expert)} {{label}} to {listing.source}")
    recs = listing.records
    images, hashes, bad_files = read_images(recs, spec.image, expert.input_size_px, progress=progress,
                                            desc=f"reading {expert.name} images")
    carve = 0.0 if any(r.split == "test" for r in recs) else test_fraction
    splits = assign_splits([r.label for r in recs], hashes, [r.split for r in recs], validation_fraction, spec.seed,
                           by_content=True, test_fraction=carve)
    problems = listing.problems + bad_files
    if recs or not listing.problems:  # an unreadable folder or manifest already says why no class has images
        problems += check_data(expert.labels, recs, hashes, splits, listing.source, how_to_add)
    return SplitData(recs, images, hashes, splits), problems


def prepare(spec: CoESpec, expert: ExpertSpec, *, validation_fraction: float, test_fraction: float = 0.0,
            progress: bool = True) -> tuple[TrainingData | None, list[DataProblem]]:
    """List, decode, split and check `expert`'s data: the arrays to train on, or None and every problem found."""
    data, problems = split_data(spec, expert, validation_fraction=validation_fraction, test_fraction=test_fraction,
                                progress=progress)
    if problems:
        return None, problems
    recs, images, splits = data.records, data.images, data.splits
    y = np.array([expert.labels.index(r.label) for r in recs], dtype=np.int64)
    w = np.array([r.weight for r in recs], dtype=np.float32)
    tr = np.array([s == "train" for s in splits], dtype=bool)
    va = np.array([s == "validation" for s in splits], dtype=bool)
    counts = {s: {lab: sum(1 for r, sp in zip(recs, splits) if sp == s and r.label == lab) for lab in expert.labels}
              for s in ("train", "validation", "test")}
    return TrainingData(images[tr], y[tr], w[tr], images[va], y[va], counts), []


def class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """'balanced': n / (k * count_c) per class c, so each class weighs the same in the loss as a whole."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w.astype(np.float32)
