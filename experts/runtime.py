"""The expert runtime: one expert's model moving between memory tiers, and inference on a batch.

Tiers: DISK (checkpoint only) -> HOST (weights in host memory) -> DEVICE (ready on the compute
device). On a CPU-only host the device *is* host memory, so HOST -> DEVICE moves no bytes and
costs ~0 s; on CUDA it is a real copy. Every move is timed and reported (`TierMove`), and the
footprint (parameters + buffers, bytes) is measured when the weights are loaded. Which experts
stay resident where is decided elsewhere (a pure policy); this class only does the moves.
"""

from __future__ import annotations

import enum
import gc
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from expertmesh.errors import FailedPrecondition, InvalidArgument
from expertmesh.experts.models import load_model, num_parameters, parameter_bytes
from expertmesh.experts.images import decode_image
from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.spec import ExpertSpec, ImageLimits


class Tier(str, enum.Enum):
    DISK = "disk"
    HOST = "host"
    DEVICE = "device"


@dataclass(frozen=True)
class TierMove:
    expert: str
    source: Tier
    target: Tier
    seconds: float
    num_bytes: int


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


def resolve_device(preference: str) -> torch.device:
    """'auto' -> cuda when present, else cpu; 'cuda' without a CUDA device is an error, not a silent fallback."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("device 'cuda' was asked for but torch sees no CUDA device", field="device",
                                 fix="use device: auto (falls back to cpu) or run on a CUDA host with the CUDA build of torch")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "auto":
        return torch.device("cpu")
    raise InvalidArgument(f"unknown device {preference!r}", field="device", fix="use auto, cpu or cuda")


class ExpertRuntime:
    """One expert: load/offload/unload between tiers and run batches. Moves are serialised by a lock."""

    def __init__(self, spec: ExpertSpec, checkpoint_dir: Path, *, device: str | None = None,
                 image_limits: ImageLimits | None = None) -> None:
        self.spec = spec
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = resolve_device(device or spec.device)
        self.image_limits = image_limits or ImageLimits()
        self._model: torch.nn.Module | None = None
        self._tier = Tier.DISK
        self._footprint_bytes = 0
        self._num_parameters = 0
        self._lock = threading.RLock()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tier(self) -> Tier:
        return self._tier

    @property
    def module(self) -> torch.nn.Module | None:
        """The loaded model (None on DISK); for measuring it (the profiler's hooks), not for moving it."""
        return self._model

    @property
    def footprint_bytes(self) -> int:
        """Parameters + buffers in bytes, measured at the last load (0 before the first)."""
        return self._footprint_bytes

    @property
    def num_parameters(self) -> int:
        """Parameter count, measured at the last load (0 before the first)."""
        return self._num_parameters

    def load(self) -> list[TierMove]:
        """Bring the expert to DEVICE, from wherever it is; returns the moves made, each timed."""
        moves: list[TierMove] = []
        with self._lock:
            if self._tier is Tier.DISK:
                t0 = time.perf_counter()
                model = load_model(self.spec, self.checkpoint_dir)
                self._footprint_bytes = parameter_bytes(model)
                self._num_parameters = num_parameters(model)
                self._model, self._tier = model, Tier.HOST
                moves.append(TierMove(self.name, Tier.DISK, Tier.HOST, time.perf_counter() - t0, self._footprint_bytes))
            if self._tier is Tier.HOST:
                t0 = time.perf_counter()
                self._model = self._model.to(self.device)
                sync_device(self.device)
                moved = self._footprint_bytes if self.device.type != "cpu" else 0
                self._tier = Tier.DEVICE
                moves.append(TierMove(self.name, Tier.HOST, Tier.DEVICE, time.perf_counter() - t0, moved))
        return moves

    def offload(self) -> TierMove | None:
        """DEVICE -> HOST (frees device memory, keeps the weights in host memory). None if not on the device."""
        with self._lock:
            if self._tier is not Tier.DEVICE:
                return None
            t0 = time.perf_counter()
            self._model = self._model.to("cpu")
            moved = self._footprint_bytes if self.device.type != "cpu" else 0
            self._tier = Tier.HOST
            _release_device_memory(self.device)
            return TierMove(self.name, Tier.DEVICE, Tier.HOST, time.perf_counter() - t0, moved)

    def unload(self) -> TierMove | None:
        """Drop the weights entirely (back to DISK). None if already there."""
        with self._lock:
            if self._tier is Tier.DISK:
                return None
            source, t0 = self._tier, time.perf_counter()
            self._model, self._tier = None, Tier.DISK
            gc.collect()
            _release_device_memory(self.device)
            return TierMove(self.name, source, Tier.DISK, time.perf_counter() - t0, self._footprint_bytes)

    @torch.inference_mode()
    def infer(self, pixel_values: torch.Tensor) -> list[Prediction]:
        """Classify a preprocessed batch [N, 3, S, S]; the expert must be on DEVICE."""
        with self._lock:
            if self._tier is not Tier.DEVICE:
                raise FailedPrecondition(f"expert {self.name!r} is in tier {self._tier.value}, not on the device",
                                         fix="call load() first")
            size = self.spec.input_size_px
            if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
                raise InvalidArgument(f"batch has shape {tuple(pixel_values.shape)}, expected [N, 3, {size}, {size}]",
                                      field="pixel_values", fix=f"preprocess with to_pixel_values(images, {size})")
            logits = self._model(pixel_values=pixel_values.to(self.device)).logits
            probs = torch.softmax(logits.float(), dim=-1).cpu()
        scores, idx = probs.max(dim=-1)
        return [Prediction(self.spec.labels[i], float(s)) for i, s in zip(idx.tolist(), scores.tolist())]

    def infer_images(self, images: list[bytes]) -> list[Prediction]:
        """Decode, validate and classify encoded images (PNG/JPEG); a bad image raises naming its index."""
        decoded = [decode_image(data, self.image_limits, field=f"images[{i}]") for i, data in enumerate(images)]
        return self.infer(to_pixel_values(decoded, self.spec.input_size_px))


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); a no-op on cpu. Time device work after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
