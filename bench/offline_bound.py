"""The offline bound: the whole CoE in one process, batched per expert (experts/offline.py's `run_coe`, which
runs BATCH images per call), on one torch thread. Timed from PNG bytes (decoding included) to every verdict."""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from expertmesh.experts.offline import BATCH, load_runtime, run_coe
from expertmesh.experts.spec import CoESpec


def decode_all(pngs: list[bytes]) -> np.ndarray:
    """PNG bytes -> uint8 RGB array [N, H, W, 3] (the generator's images share one size)."""
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs])


def offline_bound(spec: CoESpec, zoo: Path, pngs: list[bytes], repeats: int) -> dict:
    """Components/s of decode + `run_coe` over `pngs` (the median of `repeats` timed runs, after one untimed)."""
    torch.set_num_threads(1)
    runtimes = {e.name: load_runtime(spec, e, zoo) for e in spec.experts}
    run_coe(spec, runtimes, decode_all(pngs[:min(len(pngs), 32)]))  # warm-up: first calls allocate
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_coe(spec, runtimes, decode_all(pngs))
        rates.append(len(pngs) / (time.perf_counter() - t0))
    return {"components_per_s": statistics.median(rates), "runs_components_per_s": rates,
            "num_components": len(pngs), "batch": BATCH, "torch_threads": torch.get_num_threads()}
