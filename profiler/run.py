"""`expertmesh profile`: measure the experts of a zoo, keep the store current, weigh the graph, plot.

Current entries are skipped; missing ones are measured; stale ones (checkpoint, library versions or
device changed) are reported with the reason and measured again. The store is saved after every
expert, so an interrupted run keeps what it measured. What serving and planning read from the store
(current entries of the device each expert runs on) is `profiler.serving_profiles`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from expertmesh.errors import InvalidArgument
from expertmesh.experts import file_eval
from expertmesh.experts.offline import load_runtime, run_coe
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.pcb_aoi.truth import sample_pairs
from expertmesh.experts.spec import CoESpec, resolve_checkpoint
from expertmesh.profiler import usage
from expertmesh.profiler.measure import MeasureConfig, profile_expert
from expertmesh.profiler.serving_profiles import entry_and_stale_reasons, serving_batch
from expertmesh.profiler.store import ProfileStore, UsageProfile


def devices_present() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def profile_zoo(spec: CoESpec, zoo_root: Path, store_path: Path, *, devices: list[str] | None = None,
                experts: list[str] | None = None, cfg: MeasureConfig | None = None, force: bool = False,
                progress: bool = True, log: Callable[[str], None] = print) -> ProfileStore:
    devices = devices or devices_present()
    for d in devices:
        if d == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument("--device cuda was asked for but torch sees no CUDA device", field="device",
                                  fix="profile on a CUDA host, or use --device cpu")
        if d not in ("cpu", "cuda"):
            raise InvalidArgument(f"unknown device {d!r}", field="device", fix="use cpu or cuda")
    names = experts or [e.name for e in spec.experts]
    unknown = [n for n in names if n not in {e.name for e in spec.experts}]
    if unknown:
        raise InvalidArgument(f"unknown experts: {', '.join(unknown)}", field="experts",
                              fix=f"use names from the spec: {', '.join(e.name for e in spec.experts)}")
    store = ProfileStore.load(store_path) if Path(store_path).is_file() else ProfileStore(spec=spec.name)
    hashes: dict[str, str] = {}
    todo = []
    for name in names:
        for d in devices:
            entry, reasons = entry_and_stale_reasons(store, spec, zoo_root, name, d, hashes)
            if force or reasons:
                if entry is not None and reasons:
                    log(f"stale profile {name}@{d}: {'; '.join(reasons)} - measuring again")
                todo.append((name, d))
    if not todo:
        log(f"every profile in {store_path} is current ({len(names)} experts x {', '.join(devices)})")
        return store
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="profiling", unit="expert", disable=not progress)
    for name, d in todo:
        e = spec.expert(name)
        bar.set_postfix_str(f"{name}@{d}")
        p = profile_expert(e, resolve_checkpoint(e, zoo_root), d, cfg)
        store.put(p)
        store.save(store_path)
        bar.update(1)
        if not progress:
            log(f"profiled {name}@{d} in {p.seconds:.1f} s")
    bar.close()
    log(f"profiled {len(todo)} expert(s) in {time.perf_counter() - t0:.1f} s -> {store_path}")
    return store


def format_profiles(store: ProfileStore) -> str:
    head = (f"{'expert':<22}{'dev':<5}{'K ms/img':>9}{'B ms':>8}{'R2':>7}{'best n':>7}{'ms/img@n':>9}"
            f"{'weights KiB':>12}{'peak@n MiB':>11}{'disk>host ms':>13}{'host>dev ms':>12}")
    lines = [head, "-" * len(head)]
    for key in sorted(store.entries):
        p = store.entries[key]
        best = serving_batch(p)
        mv = {(m.source, m.target): m.median_s * 1000 for m in p.moves}
        lines.append(f"{p.expert:<22}{p.device:<5}{p.fit.k_ms_per_item:>9.3f}{p.fit.b_ms:>8.2f}{p.fit.r2:>7.3f}"
                     f"{p.max_useful_batch:>7}{best.median_ms / best.batch_size:>9.3f}{p.footprint_bytes / 1024:>12.0f}"
                     f"{best.peak_bytes / 2**20:>11.1f}{mv.get(('disk', 'host'), 0):>13.1f}{mv.get(('host', 'device'), 0):>12.2f}")
    if store.usage is not None:
        u = store.usage
        lines.append(f"\nusage ({u.source}, {u.num_requests} requests): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in sorted(u.usage.items(), key=lambda kv: -kv[1])))
        lines.append("dependency weights (P per request): " + ", ".join(
            f"{w.upstream}->{w.downstream} {w.probability:.3f}" for w in u.edges if w.kind == "dependency"))
    return "\n".join(lines)


def measure_usage(spec: CoESpec, zoo_root: Path, source: str, *, traces: Path | None = None,
                  sample_size: int = 2000, seed: int = 11, defect_rate: float = 0.3) -> UsageProfile:
    """Usage weights from the spec's mix, a sample run through the CoE, or recorded traces. The sample: generated
    images of the spec's category mix, or, for a CoE whose router trains on labeled files, those files' validation
    images that no model trained on (`experts.file_eval`; generated parts would be no category of it)."""
    if source == "spec":
        return usage.from_spec(spec)
    if source == "traces":
        if traces is None:
            raise InvalidArgument("--usage traces needs --traces FILE", field="traces",
                                  fix="record traces with `expertmesh station --traces FILE`")
        return usage.from_traces(spec, Path(traces))
    if source != "sample":
        raise InvalidArgument(f"unknown usage source {source!r}", field="usage", fix="use spec, sample or traces")
    if file_eval.router_on_files(spec):
        images = file_eval.held_out(spec, file_eval.read_splits(spec, progress=False), "validation").images
        if not len(images):
            raise InvalidArgument("no validation image of the spec's files is held out from every model",
                                  field="usage", fix="use --usage spec or --usage traces")
    elif spec.dataset != "pcb-aoi":
        raise InvalidArgument(f"no generator for dataset {spec.dataset!r}", field="usage",
                              fix="use --usage spec or --usage traces")
    else:
        pairs = sample_pairs(sample_size, seed, defect_rate, {c.name: c.probability for c in spec.categories})
        images = np.stack([np.asarray(generator.generate(c, d, seed, i)) for c, d, i in pairs])
    runtimes = {e.name: load_runtime(spec, e, zoo_root) for e in spec.experts}
    return usage.from_runs(spec, run_coe(spec, runtimes, images))
