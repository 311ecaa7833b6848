"""The profile store: one versioned JSON file of expert profiles and usage weights (pydantic schema).

An entry is keyed by expert and device, and records what it was measured against: the checkpoint's
content hash, the device's name and the library versions. `stale_reasons()` compares an entry with
the present; a stale entry is reported and re-measured by `expertmesh profile`, and never used by the
serving path (`usable_profiles`).
"""

from __future__ import annotations

import hashlib
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from expertmesh.errors import FailedPrecondition, InvalidArgument
from expertmesh.profiler.fit import LatencyFit

SCHEMA_VERSION = 1
DEFAULT_NAME = "profile.json"


class BatchTiming(BaseModel):
    batch_size: int = Field(ge=1)
    median_ms: float
    p10_ms: float
    p90_ms: float
    num_runs: int = Field(ge=1)
    peak_bytes: int = Field(ge=0, description="weights + input + activations: torch.cuda peak on CUDA, "
                                              "an upper bound from forward hooks on CPU")


class MoveTiming(BaseModel):
    source: str
    target: str
    median_s: float
    min_s: float
    max_s: float
    num_runs: int = Field(ge=1)


class ExpertProfile(BaseModel):
    expert: str
    device: str  # cpu | cuda
    device_name: str
    checkpoint_sha256: str
    versions: dict[str, str]
    measured_at: str
    num_parameters: int
    footprint_bytes: int = Field(description="parameters + buffers")
    batches: list[BatchTiming]
    fit: LatencyFit
    max_useful_batch: int = Field(ge=1)
    moves: list[MoveTiming]
    seconds: float = Field(description="wall time this profile took")

    @property
    def key(self) -> str:
        return entry_key(self.expert, self.device)

    def problems(self) -> list[str]:
        """Why this entry is not a usable cost model (empty: it is), each naming the value: a fit with K <= 0 or
        B < 0 (an older profiler's unconstrained fit, or a hand-edited file), no footprint, a best batch that was not
        measured, a negative move time. Every consumer goes through `stale_reasons` (so `expertmesh profile`
        measures such an entry again and serving and planning leave it out, naming it) or `require_valid`."""
        out = self.fit.problems()
        if self.footprint_bytes <= 0:
            out.append(f"footprint_bytes = {self.footprint_bytes} is not positive")
        if self.max_useful_batch not in {b.batch_size for b in self.batches}:
            out.append(f"max_useful_batch = {self.max_useful_batch} is not a measured batch size")
        out += [f"move {m.source} -> {m.target} median_s = {m.median_s:g} is negative" for m in self.moves
                if not m.median_s >= 0]
        return out

    def require_valid(self) -> ExpertProfile:
        """This entry, or FailedPrecondition naming the expert, each bad value and the fix."""
        bad = self.problems()
        if bad:
            raise FailedPrecondition(f"the profile of {self.expert}@{self.device} is not usable: {'; '.join(bad)}",
                                     field=f"profile.entries.{self.key}",
                                     fix="measure it again: `expertmesh profile --force` (or `--experts "
                                         f"{self.expert}`)")
        return self

    def move_ms(self, source: str, target: str) -> float | None:
        """The measured median of moving the weights from tier `source` to `target`, ms; None when not measured."""
        return next((1000.0 * m.median_s for m in self.moves if (m.source, m.target) == (source, target)), None)


class EdgeWeight(BaseModel):
    upstream: str
    downstream: str
    kind: str  # table | rule | fallback | dependency
    probability: float = Field(ge=0, le=1, description="P(this call happens) per request")


class UsageProfile(BaseModel):
    source: Literal["spec", "sample", "traces"]
    num_requests: int = Field(ge=0, description="requests observed (0 for the spec's expected mix)")
    usage: dict[str, float] = Field(description="P(a request invokes the expert)")
    edges: list[EdgeWeight]


class ProfileStore(BaseModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    spec: str
    entries: dict[str, ExpertProfile] = Field(default_factory=dict)
    usage: UsageProfile | None = None

    @classmethod
    def load(cls, path: Path) -> ProfileStore:
        try:
            return cls.model_validate_json(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"no profile at {path}", field="profile", fix="run `expertmesh profile` first") from None
        except ValidationError as exc:
            raise InvalidArgument(f"{path} is not a profile of this version: {exc.errors()[0]['msg']}", field="profile",
                                  fix="re-run `expertmesh profile --force` to write a new one") from None

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)

    def put(self, profile: ExpertProfile) -> None:
        self.entries[profile.key] = profile

    def get(self, expert: str, device: str) -> ExpertProfile | None:
        return self.entries.get(entry_key(expert, device))


def entry_key(expert: str, device: str) -> str:
    return f"{expert}@{device}"


def checkpoint_sha256(checkpoint_dir: Path) -> str:
    """Content hash of a checkpoint directory's files (weights and config), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(checkpoint_dir).iterdir() if p.is_file()):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def current_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.machine())
    return f"{model} ({_cpu_count()} cpus)"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stale_reasons(entry: ExpertProfile, *, checkpoint_hash: str, versions: dict[str, str], device: str) -> list[str]:
    """Why an entry no longer describes the present, or never was a usable cost model (empty: it is current and
    valid, `ExpertProfile.problems`)."""
    reasons = list(entry.problems())
    if entry.checkpoint_sha256 != checkpoint_hash:
        reasons.append("checkpoint changed")
    for lib, version in versions.items():
        if entry.versions.get(lib) != version:
            reasons.append(f"{lib} {entry.versions.get(lib, 'unknown')} -> {version}")
    if entry.device_name != device:
        reasons.append(f"device {entry.device_name!r} -> {device!r}")
    return reasons
