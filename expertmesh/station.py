"""A line-side inspection station: sends generated component images (and boards) over gRPC at a set rate, or your
own image files (`--images FOLDER`: `<folder>/.../<label>/<file>`, the label's folder name giving the truth; or
`--images MANIFEST.csv|.jsonl` with `path,label` rows). `--each N` sends every file exactly N times (singles, in a
seeded order) and stops: an exact served score, with the escape rate, the false-call rate and the confusion matrix
from the wire, and traces that name each request's file and true label.

Open loop: request i is sent at i / rate seconds whatever the server does, from a thread pool, so
a slow server shows up as latency and errors rather than as a slower client. Ground truth comes
from the generator, so the station also measures verdict accuracy. Bounded: it stops after
`duration_s` and waits at most `timeout_s` for what is in flight. A run fails (`StationReport.failure`:
`expertmesh station` exits 1) when any request failed or none was answered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections import Counter
from typing import NamedTuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import grpc
import numpy as np

from expertmesh.cli_options import emit_json
from expertmesh.errors import InvalidArgument
from expertmesh.experts.labeled_data import manifest_rows
from expertmesh.experts.line_figures import confusion_lines, line_figures
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.pcb_aoi.truth import NO_DEFECT, sample_pairs, verdict_correct
from expertmesh.experts.images import encode_png
from expertmesh.router.plan import Verdict
from expertmesh.router.trace import TraceEntry
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc

class Component(NamedTuple):
    """One part to send: its category hint, its truth (`ok` or the defect), the encoded image, and for your own
    files the file (relative to --images) and its label as given."""

    component: str
    defect: str
    image: bytes
    file: str = ""
    label: str = ""


@dataclass
class StationReport:
    target: str
    duration_s: float
    num_sent: int = 0
    num_ok: int = 0
    num_components: int = 0
    throughput_per_s: float = 0.0
    p50_ms: float | None = None  # None: no request was answered
    p99_ms: float | None = None
    verdict_accuracy: float = 0.0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    experts_hit: dict[str, int] = field(default_factory=dict)
    num_images: int | None = None  # --each: the distinct files sent, each `repeats` times
    repeats: int | None = None
    escape_rate: float | None = None  # of the defective parts answered, the share passed
    false_call_rate: float | None = None  # of the good parts answered, the share not passed
    confusion: dict[str, dict[str, int]] | None = None  # truth (good, defective) -> verdict -> count

    def failure(self) -> str | None:
        """Why this run failed (any request failed, or none was answered); None when it did not."""
        num_failed = sum(self.errors_by_code.values())
        if num_failed:
            return f"{num_failed} of {self.num_sent} requests failed"
        if self.num_ok == 0:
            return f"no request was answered ({self.num_sent} sent)"
        return None

    def format(self) -> str:
        latency = (f"latency p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms" if self.p50_ms is not None
                   else "latency: no request answered")
        lines = [f"station -> {self.target}: {self.num_sent} requests in {self.duration_s:.1f} s, "
                 f"{self.num_components} components answered ({self.throughput_per_s:.1f} components/s)",
                 f"{latency}; verdict accuracy {self.verdict_accuracy:.4f}",
                 "errors by code: " + (", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_code.items())) or "none"),
                 "expert hits: " + ", ".join(f"{k} {v}" for k, v in sorted(self.experts_hit.items(), key=lambda kv: -kv[1]))]
        if self.repeats is not None:
            lines.append(f"exact score: each of {self.num_images} images sent {self.repeats} time(s)")
        lines += confusion_lines(asdict(self))
        if (why := self.failure()) is not None:
            lines.append(f"FAILED: {why}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def sample_components(n: int, seed: int, defect_rate: float, mix: dict[str, float] | None = None) -> list[Component]:
    """n (component, defect, png) drawn from the category mix (default uniform) with the given defect rate."""
    return [Component(c, d, encode_png(generator.generate(c, d, seed, i)))
            for c, d, i in sample_pairs(n, seed, defect_rate, mix)]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_images(folder: Path, pass_labels: set[str], seed: int = 7, field: str = "--images") -> list[Component]:
    """Every PNG/JPEG file under `folder` (hidden ones skipped) as (its top sub-folder, its truth, its bytes), in a
    seeded shuffled order. Its label is the name of the folder holding it; the truth is `ok` (PASS expected) when
    that label is one of `pass_labels`, else the label (DEFECT expected). The bytes are sent as they are. A .csv or
    .jsonl `folder` is a manifest instead (`load_manifest`)."""
    folder = Path(folder)
    if folder.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        return load_manifest(folder, pass_labels, seed, field)
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                   and f.parent != folder and not any(p.startswith(".") for p in f.relative_to(folder).parts))
    if not files:
        raise InvalidArgument(f"no PNG or JPEG images under {folder} in label folders", field=field,
                              fix="give a folder laid out <folder>/<label>/<image> (deeper folders are fine; the "
                                  "image's own folder is its label)")
    order = np.random.default_rng(seed).permutation(len(files))
    return [Component(files[i].relative_to(folder).parts[0], _truth(files[i].parent.name, pass_labels),
                      files[i].read_bytes(), files[i].relative_to(folder).as_posix(), files[i].parent.name)
            for i in order]


def load_manifest(path: Path, pass_labels: set[str], seed: int = 7, field: str = "--images") -> list[Component]:
    """The rows of a manifest (`path`, `label`, optionally `category`; paths relative to its folder), in a seeded
    shuffled order; a missing file or label is an error naming the row."""
    if not path.is_file():
        raise InvalidArgument(f"no manifest at {str(path)!r}", field=field, fix="give the path of a .csv (header "
                              "path,label) or .jsonl manifest, or a folder of <label>/<image> files")
    rows, problems = manifest_rows(path)
    parts, bad = [], list(problems)
    for line, row in rows:
        rel, label = str(row.get("path", "")), str(row.get("label", ""))
        file = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        if not rel or not label or not file.is_file():
            bad.append(f"{path}:{line}: " + ("no path" if not rel else "no label" if not label else f"no file {rel}"))
            continue
        parts.append(Component(str(row.get("category", "")) or label, _truth(label, pass_labels), file.read_bytes(),
                               rel, label))
    if bad or not parts:
        raise InvalidArgument(f"manifest {path}: " + ("; ".join(bad[:5]) or "no rows"), field=field,
                              fix="give every row an existing path (relative to the manifest) and its label")
    order = np.random.default_rng(seed).permutation(len(parts))
    return [parts[i] for i in order]


def _truth(label: str, pass_labels: set[str]) -> str:
    return NO_DEFECT if label in pass_labels else label


def trace_record(resp: pb.InspectResponse, part: Component | None = None) -> dict:
    """One response as a JSON-able trace record (what `--traces` writes and the profiler reads); with your own
    files, the file sent and its true label too."""
    sent = {"file": part.file, "label": part.label, "truth": "DEFECT" if part.defect != NO_DEFECT else "PASS"} \
        if part is not None and part.file else {}
    return {**sent, "request_id": resp.request_id, "category": resp.category, "verdict": pb.Verdict.Name(resp.verdict),
            "defect": resp.defect, "latency_ms": resp.latency_ms,
            "experts": [TraceEntry.from_wire(t).wire() for t in resp.experts]}


def response_verdict(resp: pb.InspectResponse) -> Verdict:
    """The response's verdict; an unset one (VERDICT_UNSPECIFIED) counts as UNCERTAIN."""
    name = pb.Verdict.Name(resp.verdict)
    return Verdict(name) if name in Verdict.__members__ else Verdict.UNCERTAIN


class _Tally:
    """What a run has seen so far; every method may be called from the sending threads."""

    def __init__(self, traces: IO[str] | None) -> None:
        self.lock = threading.Lock()
        self.traces = traces
        self.latencies_ms: list[float] = []
        self.correct = self.answered = 0
        self.errors: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.verdicts: list[Verdict] = []
        self.is_defect: list[bool] = []

    def answer(self, resp: pb.InspectResponse, part: Component) -> None:
        with self.lock:
            self.answered += 1
            verdict = response_verdict(resp)
            self.correct += verdict_correct(verdict, part.defect)
            self.verdicts.append(verdict)
            self.is_defect.append(part.defect != NO_DEFECT)
            self.hits.update(t.expert for t in resp.experts)
            if self.traces is not None:
                self.traces.write(json.dumps(trace_record(resp, part)) + "\n")

    def request_done(self, latency_ms: float) -> None:
        with self.lock:
            self.latencies_ms.append(latency_ms)

    def request_failed(self, code: str) -> None:
        with self.lock:
            self.errors[code] += 1

    def report(self, target: str, elapsed_s: float, num_sent: int) -> StationReport:
        with self.lock:
            lat = np.array(self.latencies_ms)
            answered = bool(len(lat))
            return StationReport(
                target=target, duration_s=elapsed_s, num_sent=num_sent, num_ok=len(lat), num_components=self.answered,
                throughput_per_s=self.answered / elapsed_s, p50_ms=float(np.percentile(lat, 50)) if answered else None,
                p99_ms=float(np.percentile(lat, 99)) if answered else None,
                verdict_accuracy=self.correct / max(self.answered, 1), errors_by_code=dict(self.errors),
                experts_hit=dict(self.hits), **line_figures(self.verdicts, self.is_defect))


@dataclass(frozen=True)
class _Sender:
    """Sends request i (one component, or a board of `board_size`) and tallies what comes back."""

    stub: pb_grpc.InspectionServiceStub
    tally: _Tally
    pool: list[Component]
    token: str
    factory_id: str
    station_id: str
    board_size: int
    timeout_s: float
    coe: str = ""  # the CoE to run (a spec name); empty: the factory's default

    def __call__(self, i: int, board: bool) -> None:
        # the deadline travels as metadata too: gRPC keeps its own to itself, and the server budgets by this one
        metadata = (("authorization", f"Bearer {self.token}"), ("x-expertmesh-timeout-seconds", f"{self.timeout_s:g}"))
        t0 = time.perf_counter()
        try:
            if board:
                picks = [self.pool[(i * self.board_size + k) % len(self.pool)] for k in range(self.board_size)]
                req = pb.InspectBoardRequest(board_id=f"{self.station_id}-board-{i}", factory_id=self.factory_id,
                                             station_id=self.station_id, coe=self.coe,
                                             components=[pb.InspectRequest(image=p.image) for p in picks])
                for resp in self.stub.InspectBoard(req, metadata=metadata, timeout=self.timeout_s):
                    self.tally.answer(resp, picks[resp.component_index])
            else:
                part = self.pool[i % len(self.pool)]
                req = pb.InspectRequest(request_id=f"{self.station_id}-{i}", factory_id=self.factory_id,
                                        station_id=self.station_id, image=part.image, coe=self.coe)
                self.tally.answer(self.stub.Inspect(req, metadata=metadata, timeout=self.timeout_s), part)
            self.tally.request_done((time.perf_counter() - t0) * 1000.0)
        except grpc.RpcError as err:
            self.tally.request_failed(err.code().name)


def run_station(target: str, token: str, factory_id: str, *, rate_per_s: float, duration_s: float, station_id: str = "station-1",
                board_fraction: float = 0.1, board_size: int = 6, defect_rate: float = 0.3, seed: int = 7,
                mix: dict[str, float] | None = None, timeout_s: float = 30.0, progress: bool = True,
                traces_path: Path | None = None, pool: list[Component] | None = None, coe: str = "",
                each: int | None = None) -> StationReport:
    """`pool`: the components to send in turn (e.g. `load_images`); default 256 generated ones. `coe`: the CoE every
    request names (empty: the factory's default). `each`: send every part of the pool exactly this many times, as
    single requests at `rate_per_s`, then stop (`duration_s` is ignored): an exact score."""
    pool = pool or sample_components(256, seed, defect_rate, mix)
    total = None if each is None else each * len(pool)
    if total is not None:
        board_fraction = 0.0
    rng = np.random.default_rng(seed + 1)
    with open(traces_path, "w") if traces_path else contextlib.nullcontext() as traces:
        tally = _Tally(traces)
        start = time.perf_counter()
        next_report = start + 5.0
        sent = 0
        with grpc.insecure_channel(target) as channel, ThreadPoolExecutor(max_workers=64) as ex:
            send = _Sender(pb_grpc.InspectionServiceStub(channel), tally, pool, token, factory_id, station_id,
                           board_size, timeout_s, coe)
            while True:
                now = time.perf_counter()
                if (now - start >= duration_s) if total is None else (sent >= total):
                    break
                due = start + sent / rate_per_s
                if due > now:
                    time.sleep(min(due - now, 0.05))
                    continue
                ex.submit(send, sent, bool(rng.random() < board_fraction))
                sent += 1
                if progress and now >= next_report:
                    with tally.lock:
                        print(f"  {now - start:5.1f} s: sent {sent}, answered {tally.answered}, "
                              f"errors {sum(tally.errors.values())}", flush=True)
                    next_report += 5.0
        report = tally.report(target, time.perf_counter() - start, sent)
        if each is not None:
            report.num_images, report.repeats = len(pool), each
        return report



def cmd_station(args: argparse.Namespace) -> int:
    """`expertmesh station`: print the figures (and write them as JSON); exit 1 when the run failed."""
    if args.each is not None and not args.images:
        raise InvalidArgument("--each scores your own images exactly, but no --images were given", field="--each",
                              fix="add --images FOLDER (or a manifest), or drop --each to send generated parts")
    pool = (load_images(Path(args.images), {x.strip() for x in args.pass_labels.split(",")}, args.seed)
            if args.images else None)
    report = run_station(args.target, args.token, args.factory, rate_per_s=args.rate, duration_s=args.duration,
                         station_id=args.station, board_fraction=args.board_fraction, defect_rate=args.defect_rate,
                         seed=args.seed, progress=not args.no_progress,
                         traces_path=Path(args.traces) if args.traces else None, pool=pool, coe=args.coe or "",
                         each=args.each)
    print(report.format())
    emit_json(args, report.to_json())
    return 1 if report.failure() else 0
