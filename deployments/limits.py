"""What the ingress bounds before it does any work, beside the board limits (`deployments.board`) and the image
limits (the spec's `image:`, `experts.images`). Pure.

Every limit is a setting (`ServeSettings`, passed to the ingress) with a safe default; a request past one is refused
with a code the README's Errors section lists, naming the field and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.deployments.board import MAX_ID_CHARS, valid_id
from expertmesh.errors import InvalidArgument


class IngressLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metadata_max_entries: int = Field(16, ge=0, le=1024, description="entries in a request's metadata map")
    metadata_max_value_chars: int = Field(256, ge=1, le=65536, description="characters of one metadata value")
    decode_threads: int = Field(2, ge=1, le=64, description="threads that decode images, off the event loop")
    request_timeout_s: float = Field(60.0, gt=0, description="the longest a request may take (the proxies' "
                                                             "request_timeout_s); a client's own deadline is shorter")


def check_metadata(metadata: Mapping, limits: IngressLimits, prefix: str = "") -> dict[str, str]:
    """The request's metadata as a dict of strings, or INVALID_ARGUMENT naming the entry: at most
    `metadata_max_entries` entries (counted before anything is copied), keys are ids (`MAX_ID_CHARS` printable
    ASCII), values strings of at most `metadata_max_value_chars` characters."""
    field = prefix + "metadata"
    if not isinstance(metadata, Mapping):
        raise InvalidArgument("metadata is not a map", field=field, fix="send metadata as a map of strings to strings")
    if len(metadata) > limits.metadata_max_entries:
        raise InvalidArgument(f"metadata has {len(metadata)} entries, over the limit of {limits.metadata_max_entries}",
                              field=field, fix=f"send at most {limits.metadata_max_entries} entries")
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or not valid_id(key):
            raise InvalidArgument(f"metadata key {str(key)[:32]!r} is not 1..{MAX_ID_CHARS} printable ASCII "
                                  "characters", field=field, fix="use short printable ASCII keys")
        if not isinstance(value, str):
            raise InvalidArgument(f"metadata[{key!r}] is a {type(value).__name__}, not a string", field=f"{field}.{key}",
                                  fix="send every metadata value as a string")
        if len(value) > limits.metadata_max_value_chars:
            raise InvalidArgument(f"metadata[{key!r}] is {len(value)} characters, over the limit of "
                                  f"{limits.metadata_max_value_chars}", field=f"{field}.{key}",
                                  fix=f"send at most {limits.metadata_max_value_chars} characters per value")
        out[key] = value
    return out
