"""The seeded workload of the memory-limited benchmark: a larger PCB CoE (48 experts by default) and its requests.

`build_workload_coe` writes `<out>/spec.yaml` (a valid CoE spec whose zoo_dir is `zoo`) and `<out>/zoo/<expert>/`
(save_pretrained checkpoints). The experts are seeded initialisations, not trained: the benchmark measures serving,
and only needs every system to give the same answers. So that their outputs behave like a workload's, each
classifier's output bias is shifted (`memory_workload_calibrate`) until its labels on calibration images follow a
seeded label mix; each dependency edge's trigger labels are then picked to land near the edge's target rate, and
the spec records the rate measured on the images of the workload's first requests (held out from calibration).
A build is stamped with its config's hash and skipped when the stamp matches. The structure of the CoE is
`memory_workload_layout`'s; the request stream and its images are `memory_workload_requests`'.

    python -m expertmesh.bench.memory_workload [--out DIR] [--small N] [--large N] [--input-size PX] [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from expertmesh.bench.memory_workload_calibrate import (calibrate_bias, choose_on_labels, edge_rate, expert_logits,
                                                        label_shares, shift_classifier_bias)
from expertmesh.bench.memory_workload_layout import (LARGE_ARCHITECTURE, SMALL_ARCHITECTURE, ExpertLayout,
                                                     MemoryWorkloadConfig, WorkloadLayout, plan_layout)
from expertmesh.bench.memory_workload_requests import (WorkloadRequest, image_seed_for, make_requests, pattern_image,
                                                       request_images)
from expertmesh.errors import FailedPrecondition, SpecError
from expertmesh.experts.models import build_model, num_parameters, parameter_bytes
from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.spec import CoESpec, ExpertSpec, load_spec, resolve_checkpoint
from expertmesh.experts.zoo import META_FILE, fingerprint
from expertmesh.home import expertmesh_home

__all__ = ["MemoryWorkloadConfig", "WorkloadRequest", "build_workload_coe", "default_workload_dir", "expert_bytes",
           "make_requests", "request_images", "workload_summary"]

WORKLOAD_VERSION = "memory-workload-1"  # bump when a change to this code changes what a config builds
STAMP_FILE = "workload.json"
SPEC_FILE = "spec.yaml"
ZOO_DIR = "zoo"
SPEC_NAME = "pcb-aoi-memory"
NUM_CALIBRATION_IMAGES = 256
NUM_MEASURE_IMAGES = 256  # the images of the workload's first requests (seed = config.seed)
_CALIBRATION_STREAM = 0x43414C49
_MAX_BATCH = {False: 32, True: 16}


def default_workload_dir() -> Path:
    return expertmesh_home() / "bench" / "memory-coe"


def config_hash(config: MemoryWorkloadConfig) -> str:
    payload = {"config": config.model_dump(), "version": WORKLOAD_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def expert_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:4], "little")


def is_built(out_dir: Path, config: MemoryWorkloadConfig) -> bool:
    """The stamp names this config and the spec loads with every checkpoint present."""
    try:
        stamp = json.loads((out_dir / STAMP_FILE).read_text())
        if stamp.get("config_hash") != config_hash(config):
            return False
        load_spec(out_dir / SPEC_FILE, zoo_root=out_dir / ZOO_DIR)
    except (OSError, ValueError, SpecError):
        return False
    return True


def expert_data(e: ExpertLayout, config: MemoryWorkloadConfig) -> dict:
    return {"name": e.name, "task": "route" if e.role == "router" else "classify",
            "architecture": {"family": "resnet", "config": LARGE_ARCHITECTURE if e.large else SMALL_ARCHITECTURE},
            "checkpoint": e.name, "input_size_px": config.input_size_px, "labels": list(e.labels),
            "pass_labels": list(e.pass_labels), "max_batch": _MAX_BATCH[e.large]}


class _SpecDumper(yaml.SafeDumper):
    """Writes every shared value in full (no YAML anchors): the spec reads like a hand-written one."""

    def ignore_aliases(self, data) -> bool:
        return True


def _pixel_values(seeds: list[int], size_px: int) -> torch.Tensor:
    return to_pixel_values(np.stack([pattern_image(s, size_px) for s in seeds]), size_px)


def _save_checkpoint(model, checkpoint_dir: Path) -> None:
    tmp = checkpoint_dir.with_name(checkpoint_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    tmp.rename(checkpoint_dir)


def _build_experts(layout: WorkloadLayout, config: MemoryWorkloadConfig, zoo_root: Path,
                   progress: Callable[[str], object]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Build, calibrate and save every expert; returns its labels on the calibration and the measure images."""
    size = config.input_size_px
    calibration = _pixel_values([int(np.random.SeedSequence([config.seed, _CALIBRATION_STREAM, i]).generate_state(1)[0])
                                 for i in range(NUM_CALIBRATION_IMAGES)], size)
    measure = _pixel_values([image_seed_for(config.seed, i) for i in range(NUM_MEASURE_IMAGES)], size)
    labels_cal, labels_meas, stats = {}, {}, {"min_relative_margin": np.inf, "near_ties": 0}
    for i, e in enumerate(layout.experts, 1):
        t0 = time.perf_counter()
        model = build_model(ExpertSpec.model_validate(expert_data(e, config)), expert_seed(config.seed, e.name))
        calibration_logits = expert_logits(model, calibration)
        offset = calibrate_bias(calibration_logits, layout.label_mix[e.name])
        shift_classifier_bias(model, offset)
        labels_cal[e.name] = (calibration_logits + offset).argmax(axis=1)  # the shifted model's labels, but rounding
        logits = expert_logits(model, measure)
        labels_meas[e.name] = logits.argmax(axis=1)
        top2 = np.sort(logits, axis=1)[:, -2:]
        relative_margin = (top2[:, 1] - top2[:, 0]) / (np.abs(logits).max(axis=1) + 1e-12)
        stats["min_relative_margin"] = min(stats["min_relative_margin"], float(relative_margin.min()))
        stats["near_ties"] += int((relative_margin < 1e-3).sum())
        ckpt = zoo_root / e.name
        _save_checkpoint(model, ckpt)
        shares = label_shares(labels_meas[e.name], len(e.labels))
        mix = ", ".join(f"{label} {share:.2f}" for label, share in zip(e.labels, shares) if share > 0)
        progress(f"[{i}/{len(layout.experts)}] {e.name}: {num_parameters(model):,} parameters, "
                 f"{parameter_bytes(model) / 1e6:.1f} MB, labels {mix} -> {ckpt} ({time.perf_counter() - t0:.1f} s)")
    stats["near_tie_share"] = stats.pop("near_ties") / (NUM_MEASURE_IMAGES * len(layout.experts))
    return labels_cal, labels_meas, stats


def _dependencies(layout: WorkloadLayout, labels_cal: dict[str, np.ndarray],
                  labels_meas: dict[str, np.ndarray]) -> list[dict]:
    """Each edge's trigger labels (picked on the calibration images) and its measured rate (on the measure images).

    A component expert may see any image (images do not depend on the category), so every image weighs 1; a
    detector sees an image with weight sum over its upstream components c of P(c runs) x [c's label triggers it]."""
    p_component = layout.component_probabilities()
    reach_cal: dict[str, np.ndarray] = {}
    reach_meas: dict[str, np.ndarray] = {}
    out = []
    for edge in layout.edges:
        names = layout.expert(edge.upstream).labels
        if edge.upstream in p_component:
            r_cal, r_meas = np.ones(NUM_CALIBRATION_IMAGES), np.ones(NUM_MEASURE_IMAGES)
        else:
            r_cal, r_meas = reach_cal[edge.upstream], reach_meas[edge.upstream]
        on_labels, _ = choose_on_labels(labels_cal[edge.upstream], r_cal, names, edge.target_rate)
        rate = edge_rate(labels_meas[edge.upstream], on_labels, names, r_meas)
        out.append({"upstream": edge.upstream, "on_labels": on_labels, "downstream": edge.downstream,
                    "trigger_probability": round(rate, 4)})
        if edge.kind == "detector":
            p = p_component[edge.upstream]
            idx = [names.index(x) for x in on_labels]
            for reach, labels in ((reach_cal, labels_cal), (reach_meas, labels_meas)):
                hit = np.isin(labels[edge.upstream], idx).astype(float)
                reach[edge.downstream] = reach.get(edge.downstream, 0.0) + p * hit
    return out


def _category_data(layout: WorkloadLayout) -> list[dict]:
    probs = [round(p, 6) for _, _, p in layout.categories]
    probs[0] = round(probs[0] + 1.0 - sum(probs), 12)  # the most likely category absorbs the rounding
    return [{"name": c, "experts": [e], "probability": p} for (c, e, _), p in zip(layout.categories, probs)]


def spec_data(layout: WorkloadLayout, config: MemoryWorkloadConfig, dependencies: list[dict]) -> dict:
    num_large = sum(e.large for e in layout.experts)
    return {
        "name": SPEC_NAME, "version": 1,
        "description": (f"Memory-limited benchmark CoE: {len(layout.categories)} component types, "
                        f"{len(layout.experts)} experts ({len(layout.experts) - num_large} tiny ResNets, {num_large} "
                        f"ResNet-18-class detectors), seeded init with calibrated output bias (not trained); "
                        f"built by expertmesh.bench.memory_workload {WORKLOAD_VERSION}"),
        "zoo_dir": ZOO_DIR, "dataset": "pcb-aoi", "seed": config.seed,
        # The router's calibrated argmax follows the category mix; a station that knows the part (CAD data) sends
        # component_hint and the matching rule forces its category, so the benchmark's mix is the request stream's.
        "router": {"expert": "component_router", "min_confidence": 0.0, "fallback_expert": None,
                   "expected_fallback_probability": 0.0},
        "experts": [expert_data(e, config) for e in layout.experts],
        "categories": _category_data(layout),
        "dependencies": dependencies,
        "gating_rules": [{"name": f"cad_{c}", "match": {"component_hint": [c]}, "force_category": c}
                         for c, _, _ in layout.categories],
    }


def expert_bytes(spec: CoESpec, zoo_root: Path) -> dict[str, int]:
    """Parameter + buffer bytes per expert, read from each checkpoint's safetensors header (no weights loaded)."""
    out = {}
    for e in spec.experts:
        path = resolve_checkpoint(e, Path(zoo_root)) / "model.safetensors"
        try:
            with path.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, struct.error) as exc:
            raise FailedPrecondition(f"cannot read the safetensors header of {str(path)!r} ({exc})",
                                     field=f"experts.{e.name}.checkpoint",
                                     fix="build the workload's zoo with build_workload_coe") from None
        out[e.name] = sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    return out


def workload_summary(spec: CoESpec, zoo_root: Path) -> dict:
    """Sizes and rates of a built workload CoE: what the benchmark's budget is a fraction of."""
    sizes = expert_bytes(spec, zoo_root)
    large = {e.name for e in spec.experts if e.architecture.config == LARGE_ARCHITECTURE}
    total = sum(sizes.values())
    return {
        "num_experts": len(spec.experts), "num_large_experts": len(large), "num_categories": len(spec.categories),
        "num_dependencies": len(spec.dependencies), "total_bytes": total,
        "large_bytes": sum(sizes[n] for n in large), "small_bytes": sum(v for n, v in sizes.items() if n not in large),
        "max_expert_bytes": max(sizes.values()), "one_third_bytes": total // 3,
        "top_category_probability": max(c.probability for c in spec.categories),
        "trigger_probabilities": {f"{d.upstream}->{d.downstream}": d.trigger_probability for d in spec.dependencies},
    }


def build_workload_coe(out_dir: Path, config: MemoryWorkloadConfig, progress: Callable[[str], object] = print) -> Path:
    """Write out_dir/spec.yaml and out_dir/zoo/<expert>/ for `config` (skipped when a stamp says it is built);
    returns the spec's path. Owns out_dir/zoo, spec.yaml and the stamp: a rebuild replaces them."""
    out_dir = Path(out_dir)
    spec_path, zoo_root = out_dir / SPEC_FILE, out_dir / ZOO_DIR
    if is_built(out_dir, config):
        progress(f"memory workload up to date ({STAMP_FILE} matches the config), skipped: {spec_path}")
        return spec_path
    t0 = time.perf_counter()
    layout = plan_layout(config)
    progress(f"building the memory workload CoE: {len(layout.experts)} experts, {len(layout.categories)} categories "
             f"-> {out_dir}")
    (out_dir / STAMP_FILE).unlink(missing_ok=True)
    shutil.rmtree(zoo_root, ignore_errors=True)
    zoo_root.mkdir(parents=True)
    labels_cal, labels_meas, stats = _build_experts(layout, config, zoo_root, progress)
    data = spec_data(layout, config, _dependencies(layout, labels_cal, labels_meas))
    spec_path.write_text(yaml.dump(data, Dumper=_SpecDumper, sort_keys=False, width=120, default_flow_style=None))
    spec = load_spec(spec_path, zoo_root=zoo_root)
    for e in spec.experts:  # `expertmesh zoo build` on this spec then finds every checkpoint current
        meta = {"expert": e.name, "fingerprint": fingerprint(spec, e), "labels": list(e.labels),
                "input_size_px": e.input_size_px, "built_by": WORKLOAD_VERSION, "trained": False}
        (resolve_checkpoint(e, zoo_root) / META_FILE).write_text(json.dumps(meta, indent=2))
    summary = workload_summary(spec, zoo_root)
    stamp = {"config_hash": config_hash(config), "config": config.model_dump(), "version": WORKLOAD_VERSION,
             "seconds": round(time.perf_counter() - t0, 1), "calibration": stats, **summary}
    (out_dir / STAMP_FILE).write_text(json.dumps(stamp, indent=2))
    progress(f"memory workload built in {stamp['seconds']} s: {summary['num_experts']} experts, "
             f"{summary['total_bytes'] / 1e6:.1f} MB ({summary['large_bytes'] / 1e6:.1f} MB in the "
             f"{summary['num_large_experts']} large ones) -> {spec_path}")
    return spec_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m expertmesh.bench.memory_workload", description=__doc__.split("\n")[0])
    defaults = MemoryWorkloadConfig()
    p.add_argument("--out", type=Path, default=default_workload_dir())
    p.add_argument("--small", type=int, default=defaults.num_small_experts)
    p.add_argument("--large", type=int, default=defaults.num_large_experts)
    p.add_argument("--input-size", type=int, default=defaults.input_size_px)
    p.add_argument("--seed", type=int, default=defaults.seed)
    args = p.parse_args(argv)
    config = MemoryWorkloadConfig(num_small_experts=args.small, num_large_experts=args.large,
                                  input_size_px=args.input_size, seed=args.seed)
    spec_path = build_workload_coe(args.out, config)
    print(json.dumps(workload_summary(load_spec(spec_path), spec_path.parent / ZOO_DIR), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
