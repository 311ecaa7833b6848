"""The expert runtime: one expert's model moving between memory tiers, and inference on a batch.

Tiers: DISK (the checkpoint's safetensors file) -> HOST (the weights as a state dict in host memory, pinned on
CUDA) -> DEVICE (a model built on the compute device, ready to run). The host copy is kept while the expert is on
the device (the tiers are inclusive), so sending an expert back to host memory frees device memory at no cost and
bringing it back is one copy: the model's modules are kept on the `meta` device (no storage; built once, without
initialisation, from the first load), their storage allocated on the device and the host state dict copied in. On a CPU-only host the "device" copy is a second copy in the same
memory - the budget of resident models - and HOST -> DEVICE is a memcpy. DISK -> HOST reads the safetensors file
(memory-mapped by safetensors). Every move is timed and reported (`TierMove`, with the bytes it moved); the
footprint (parameters + buffers, bytes) is known before any load, from the checkpoint's header. Which experts stay
resident where is decided elsewhere (pure policies); this class only does the moves.
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
from safetensors import safe_open
from safetensors.torch import load_file

from expertmesh.experts.operating_point import decide, pass_mask
from expertmesh.experts.checkpoint_header import WEIGHTS_FILE, checkpoint_bytes
from expertmesh.experts.models import load_model, num_parameters
from expertmesh.experts.images import decode_image
from expertmesh.experts.image_processing import read_processing
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

    WEIGHTS_FILE = WEIGHTS_FILE

    def __init__(self, spec: ExpertSpec, checkpoint_dir: Path, *, device: str | None = None,
                 image_limits: ImageLimits | None = None) -> None:
        self.spec = spec
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = resolve_device(device or spec.device)
        self.image_limits = image_limits or ImageLimits()
        #: a brought checkpoint's own preprocessing (its preprocessor_config.json); None: the default preprocessing
        self.processing = read_processing(self.checkpoint_dir)
        self._model: torch.nn.Module | None = None  # on the device
        self._host_weights: dict[str, torch.Tensor] | None = None  # in host memory
        self._transient: dict[str, torch.Tensor] = {}  # non-persistent buffers, restored after each load
        self._raw_keys_match = False  # the safetensors file's keys are the model's (no conversion on load)
        self._husk: torch.nn.Module | None = None  # the model's modules on `meta` (no storage), reused by every load
        self._footprint_bytes = 0
        self._num_parameters = 0
        self._lock = threading.RLock()
        self._pass_mask = pass_mask(spec.labels, spec.pass_labels)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tier(self) -> Tier:
        """The fastest tier the expert is in (DEVICE implies a host copy too, unless it was dropped)."""
        if self._model is not None:
            return Tier.DEVICE
        return Tier.HOST if self._host_weights is not None else Tier.DISK

    @property
    def on_device(self) -> bool:
        return self._model is not None

    @property
    def in_host(self) -> bool:
        """A copy of the weights is held in host memory."""
        return self._host_weights is not None

    @property
    def module(self) -> torch.nn.Module | None:
        """The loaded model (None unless on the device); for measuring it (the profiler's hooks), not for moving it."""
        return self._model

    @property
    def footprint_bytes(self) -> int:
        """Parameters + buffers in bytes, read from the checkpoint's header (what one copy of the weights takes)."""
        if not self._footprint_bytes:
            self._footprint_bytes = checkpoint_bytes(self.checkpoint_dir / self.WEIGHTS_FILE)
        return self._footprint_bytes

    @property
    def num_parameters(self) -> int:
        """Parameter count, measured at the last load onto the device (0 before the first)."""
        return self._num_parameters

    def load(self, *, keep_host_copy: bool = True) -> list[TierMove]:
        """Bring the expert to DEVICE, from wherever it is; returns the moves made, each timed. Without
        `keep_host_copy` the host copy read from disk on the way is dropped once the device copy is made."""
        moves: list[TierMove] = []
        with self._lock:
            if self._model is not None:
                return moves
            read_from_disk = self._host_weights is None
            if read_from_disk:
                moves.append(self._read_weights())
            t0 = time.perf_counter()
            model, self._husk = self._husk.to_empty(device=self.device), None
            model.load_state_dict(self._host_weights, strict=True)
            for name, value in self._transient.items():  # buffers not in a state dict (e.g. position ids)
                model.get_buffer(name).copy_(value)
            sync_device(self.device)
            self._model = model.eval()
            self._num_parameters = num_parameters(model)
            moves.append(TierMove(self.name, Tier.HOST, Tier.DEVICE, time.perf_counter() - t0, self.footprint_bytes))
            if read_from_disk and not keep_host_copy:
                self._host_weights = None
        return moves

    def fetch_to_host(self) -> TierMove | None:
        """DISK -> HOST: read the weights into host memory (a prefetch, or warming the host tier). None if held."""
        with self._lock:
            return self._read_weights() if self._host_weights is None and self._model is None else None

    def offload(self) -> TierMove | None:
        """DEVICE -> HOST: free the device copy, keeping (or making) the host copy. None if not on the device."""
        with self._lock:
            if self._model is None:
                return None
            t0 = time.perf_counter()
            moved = 0
            if self._host_weights is None:  # dropped earlier: copy the weights back
                self._host_weights = _host_state_dict(self._model, self.device)
                moved = self.footprint_bytes
            self._husk, self._model = self._model.to("meta"), None  # frees the storage, keeps the modules
            _release_device_memory(self.device)
            return TierMove(self.name, Tier.DEVICE, Tier.HOST, time.perf_counter() - t0, moved)

    def drop_host_copy(self) -> bool:
        """Free the host-memory copy (the device copy, if any, stays). True if one was dropped."""
        with self._lock:
            dropped, self._host_weights = self._host_weights is not None, None
            return dropped

    def unload(self, *, collect: bool = True) -> TierMove | None:
        """Drop the weights entirely (back to DISK). None if already there. `collect`: run a full garbage collection
        after (frees cyclic leftovers at once; it takes about 0.2 s in a loaded process and holds the GIL)."""
        with self._lock:
            if self._model is None and self._host_weights is None:
                return None
            source, t0 = self.tier, time.perf_counter()
            if self._model is not None:
                self._husk = self._model.to("meta")
            self._model, self._host_weights = None, None
            if collect:
                gc.collect()
            _release_device_memory(self.device)
            return TierMove(self.name, source, Tier.DISK, time.perf_counter() - t0, self.footprint_bytes)

    def _read_weights(self) -> TierMove:
        """DISK -> HOST. The first read goes through `from_pretrained` (it checks the labels and converts renamed keys of
        older checkpoints) and keeps the model's modules as the husk; later reads take the safetensors file as it is,
        when its keys are the model's."""
        t0 = time.perf_counter()
        path = self.checkpoint_dir / self.WEIGHTS_FILE
        if not self._raw_keys_match:  # the first read, or a checkpoint whose keys need converting
            model = load_model(self.spec, self.checkpoint_dir)
            weights = {k: v.detach() for k, v in model.state_dict().items()}
            with safe_open(str(path), framework="pt") as f:
                self._raw_keys_match = set(f.keys()) == set(weights)
            if self._model is None:
                self._transient = _non_persistent_buffers(model)
                self._husk = model.to("meta")
        else:
            try:
                weights = load_file(str(path), device="cpu")
            except (OSError, ValueError) as exc:
                raise FailedPrecondition(f"cannot read checkpoint {str(path)!r}: {exc}",
                                         field=f"experts.{self.name}.checkpoint",
                                         fix="rebuild the zoo (`expertmesh zoo build`)") from None
        if self.device.type == "cuda":
            weights = {k: v.pin_memory() for k, v in weights.items()}  # so HOST -> DEVICE is one DMA copy
        self._host_weights = weights
        return TierMove(self.name, Tier.DISK, Tier.HOST, time.perf_counter() - t0, self.footprint_bytes)

    @torch.inference_mode()
    def infer(self, pixel_values: torch.Tensor) -> list[Prediction]:
        """Classify a preprocessed batch [N, 3, S, S] at the expert's operating point; it must be on DEVICE."""
        idx, scores = decide(self.probabilities(pixel_values), self._pass_mask, self.spec.pass_min_probability)
        return [Prediction(self.spec.labels[i], float(s)) for i, s in zip(idx.tolist(), scores.tolist())]

    @torch.inference_mode()
    def probabilities(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The softmax over the expert's labels [N, K] of a preprocessed batch [N, 3, S, S] (on DEVICE)."""
        with self._lock:
            if self._model is None:
                raise FailedPrecondition(f"expert {self.name!r} is in tier {self.tier.value}, not on the device",
                                         fix="call load() first")
            size = self.spec.input_size_px
            if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
                raise InvalidArgument(f"batch has shape {tuple(pixel_values.shape)}, expected [N, 3, {size}, {size}]",
                                      field="pixel_values", fix=f"preprocess with to_pixel_values(images, {size})")
            logits = self._model(pixel_values=pixel_values.to(self.device)).logits
            return torch.softmax(logits.float(), dim=-1).cpu()

    def pixel_values(self, images) -> torch.Tensor:
        """Decoded RGB images (PIL, or uint8 arrays [N, H, W, 3]) -> this expert's input batch: the checkpoint's
        own preprocessing when it has a preprocessor_config.json, else the default."""
        return to_pixel_values(images, self.spec.input_size_px, self.processing)

    def infer_images(self, images: list[bytes]) -> list[Prediction]:
        """Decode, validate and classify encoded images (PNG/JPEG); a bad image raises naming its index."""
        decoded = [decode_image(data, self.image_limits, field=f"images[{i}]") for i, data in enumerate(images)]
        return self.infer(self.pixel_values(decoded))


def _non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, mod in model.named_modules():
        for name in mod._non_persistent_buffers_set:
            buf = mod._buffers.get(name)
            if buf is not None:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().clone()
    return out


def _host_state_dict(model: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return {k: v.detach() for k, v in model.state_dict().items()}
    return {k: v.detach().to("cpu").pin_memory() for k, v in model.state_dict().items()}


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); a no-op on cpu. Time device work after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
