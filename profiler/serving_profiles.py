"""The profile entries that serving and planning use: for each expert, the current entry of the device it runs on.

`serving_device` decides that device from the spec and the replica's GPUs alone (a cuda/auto expert given GPUs runs
on cuda, every other expert on cpu), never from the machine that asks: the planner (`expertmesh plan`, the re-plan
controller) and the Serve app (built by `expertmesh serve`, or by a CPU-only head from `expertmesh config`'s file)
read the same entries. Stale entries (checkpoint, library versions or device changed) are left out with a warning;
`expertmesh profile` measures them again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from expertmesh.experts.spec import CoESpec, ExpertSpec, resolve_checkpoint
from expertmesh.profiler.store import (DEFAULT_NAME, BatchTiming, ExpertProfile, ProfileStore, checkpoint_sha256,
                                       current_versions, device_name, stale_reasons)


def default_store_path(zoo_root: Path) -> Path:
    return Path(zoo_root) / DEFAULT_NAME


def serving_device(expert: ExpertSpec, expert_num_gpus: float) -> str:
    """`cuda` when the expert's replicas get GPUs (a cuda or auto expert, `expert_num_gpus` > 0), else `cpu`."""
    return "cuda" if expert.device in ("cuda", "auto") and expert_num_gpus > 0 else "cpu"


def serving_devices(spec: CoESpec, expert_num_gpus: float) -> dict[str, str]:
    """`serving_device` of every expert, by name."""
    return {e.name: serving_device(e, expert_num_gpus) for e in spec.experts}


def serving_batch(profile: ExpertProfile) -> BatchTiming:
    """The measured batch a replica serves at: the profile's largest useful batch (else the largest measured)."""
    return next((b for b in profile.batches if b.batch_size == profile.max_useful_batch), profile.batches[-1])


def entry_and_stale_reasons(store: ProfileStore, spec: CoESpec, zoo_root: Path, expert: str, device: str,
                            hashes: dict[str, str]) -> tuple[ExpertProfile | None, list[str]]:
    """The store's entry of `expert` on `device` and why it is stale (empty: current); `hashes` caches checkpoint
    hashes across calls."""
    entry = store.get(expert, device)
    if entry is None:
        return None, ["not measured"]
    if expert not in hashes:
        hashes[expert] = checkpoint_sha256(resolve_checkpoint(spec.expert(expert), zoo_root))
    return entry, stale_reasons(entry, checkpoint_hash=hashes[expert], versions=current_versions(),
                                device=_device_name_here(device, entry))


def _device_name_here(device: str, entry: ExpertProfile) -> str:
    """This machine's name of `device`; for cuda on a machine without one (planning or writing a Serve config for
    GPU workers from a CPU-only host) the entry's own: the GPU's name can only be checked where it is."""
    if device == "cuda":
        import torch  # heavy (seconds): imported only when a cuda entry is looked at

        if not torch.cuda.is_available():
            return entry.device_name
    return device_name(device)


def usable_profiles(store: ProfileStore, spec: CoESpec, zoo_root: Path, device: str | Mapping[str, str],
                    warn: Callable[[str], None] | None = None) -> dict[str, ExpertProfile]:
    """Current entries by expert, each for `device` (one for all, or by expert name as `serving_devices` gives);
    each stale entry is reported through `warn` and left out."""
    out, hashes = {}, {}
    for e in spec.experts:
        d = device if isinstance(device, str) else device[e.name]
        entry, reasons = entry_and_stale_reasons(store, spec, zoo_root, e.name, d, hashes)
        if entry is None:
            continue
        if reasons:
            if warn:
                warn(f"profile of {e.name}@{d} is stale ({'; '.join(reasons)}); using the spec's values - "
                     "re-run `expertmesh profile`")
            continue
        out[e.name] = entry
    return out
