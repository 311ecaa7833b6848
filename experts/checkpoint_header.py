"""What an expert's safetensors checkpoint holds, from its header alone: no tensor is read, torch is not imported.

The format: 8 bytes (little-endian u64) giving the header's length, then a JSON header mapping each tensor's name
to its dtype, shape and byte range. Used for an expert's footprint before it is loaded (the runtime) and by the
planner when there is no profile (`cluster.demand.checkpoint_problem`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from expertmesh.experts.image_processing import PREPROCESSOR_FILE
from expertmesh.experts.spec import PRETRAINED_WEIGHTS

WEIGHTS_FILE = "model.safetensors"  # the checkpoint's weights inside an expert's checkpoint directory


def checkpoint_bytes(path: Path) -> int:
    """Bytes of every tensor in a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(end - start for name, t in header.items() if name != "__metadata__" for start, end in [t["data_offsets"]])


def checkpoint_digest(directory: Path) -> str:
    """sha256 over a brought checkpoint's config, weights and preprocessor config (names and bytes)."""
    h = hashlib.sha256()
    for name in ("config.json", *PRETRAINED_WEIGHTS, PREPROCESSOR_FILE):
        path = Path(directory) / name
        if path.is_file():
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
