"""Measure one expert on one device: latency against batch size, peak memory, tier-move times.

Everything is timed the way a serving replica runs it: one torch thread (configurable), a batch is
preprocessing (decoded RGB -> pixel values) plus inference, warm-up runs are not counted, and each
point is the median of repeated runs with its 10th-90th percentile spread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from expertmesh.experts.runtime import ExpertRuntime, Tier, sync_device
from expertmesh.experts.spec import ExpertSpec
from expertmesh.profiler.fit import batch_sizes_up_to, fit_linear, largest_useful_batch
from expertmesh.profiler.store import (BatchTiming, ExpertProfile, MoveTiming, checkpoint_sha256, current_versions,
                                       device_name, now_iso)


class MeasureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    runs: int = Field(15, ge=1, description="timed runs per batch size")
    warmup_runs: int = Field(3, ge=0, description="untimed runs before them")
    move_runs: int = Field(5, ge=1, description="repetitions of each tier move")
    max_batch: int | None = Field(None, ge=2, description="largest batch measured (default: the spec's max_batch)")
    min_gain: float = Field(0.05, ge=0, lt=1, description="per-item improvement a larger batch must bring")
    memory_limit_bytes: int | None = Field(None, ge=1, description="a batch whose peak exceeds this is not useful")
    source_px: int = Field(96, ge=8, description="side of the decoded images fed to preprocessing")
    num_threads: int = Field(1, ge=1, description="torch threads, as in a serving replica")


def _activation_bytes(model: torch.nn.Module, run: Callable[[], object]) -> int:
    """Bytes of every leaf module's output during one forward pass (an upper bound of live activations)."""
    total = 0

    def hook(_m, _inp, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total


def _time_moves(rt: ExpertRuntime, runs: int) -> list[MoveTiming]:
    seen: dict[tuple[str, str], list[float]] = {}
    for _ in range(runs):
        if rt.tier is not Tier.DISK:
            rt.unload()
        moves = rt.load()
        off = rt.offload()
        moves += [off] if off else []
        moves += rt.load()  # host -> device again
        down = rt.unload()
        moves += [down] if down else []
        for m in moves:
            seen.setdefault((m.source.value, m.target.value), []).append(m.seconds)
    rt.load()
    return [MoveTiming(source=s, target=t, median_s=float(np.median(v)), min_s=min(v), max_s=max(v), num_runs=len(v))
            for (s, t), v in seen.items()]


def profile_expert(expert: ExpertSpec, checkpoint_dir: Path, device: str, cfg: MeasureConfig | None = None,
                   on_step: Callable[[str], None] | None = None) -> ExpertProfile:
    cfg = cfg or MeasureConfig()
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.num_threads)
    rt = ExpertRuntime(expert, checkpoint_dir, device=device)
    moves = _time_moves(rt, cfg.move_runs)
    if on_step:
        on_step("tier moves")
    dev = rt.device
    rng = np.random.default_rng(0)
    sizes = batch_sizes_up_to(cfg.max_batch or max(2, expert.max_batch))
    batches: list[BatchTiming] = []
    for n in sizes:
        images = [rng.integers(0, 256, (cfg.source_px, cfg.source_px, 3), dtype=np.uint8) for _ in range(n)]

        def run() -> None:
            rt.infer(rt.pixel_values(images))

        try:
            for _ in range(cfg.warmup_runs):
                run()
            if dev.type == "cuda":
                sync_device(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            times_ms = []
            for _ in range(cfg.runs):
                sync_device(dev)
                t0 = time.perf_counter()
                run()
                sync_device(dev)
                times_ms.append((time.perf_counter() - t0) * 1000.0)
            if dev.type == "cuda":
                peak = int(torch.cuda.max_memory_allocated(dev))
            else:
                input_bytes = n * 3 * expert.input_size_px ** 2 * 4
                peak = rt.footprint_bytes + input_bytes + _activation_bytes(rt.module, run)
        except torch.OutOfMemoryError:
            break  # memory ran out: the previous size is the largest that fits
        batches.append(BatchTiming(batch_size=n, median_ms=float(np.median(times_ms)),
                                   p10_ms=float(np.percentile(times_ms, 10)), p90_ms=float(np.percentile(times_ms, 90)),
                                   num_runs=len(times_ms), peak_bytes=peak))
        if on_step:
            on_step(f"batch {n}")
    xs, ys = [b.batch_size for b in batches], [b.median_ms for b in batches]
    profile = ExpertProfile(
        expert=expert.name, device=dev.type, device_name=device_name(dev.type),
        checkpoint_sha256=checkpoint_sha256(checkpoint_dir), versions=current_versions(), measured_at=now_iso(),
        num_parameters=rt.num_parameters, footprint_bytes=rt.footprint_bytes, batches=batches, fit=fit_linear(xs, ys),
        max_useful_batch=largest_useful_batch(xs, ys, min_gain=cfg.min_gain, peak_bytes=[b.peak_bytes for b in batches],
                                              memory_limit_bytes=cfg.memory_limit_bytes),
        moves=moves, seconds=time.perf_counter() - t_start)
    rt.unload()
    return profile
