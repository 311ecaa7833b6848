"""Where the running placement lives in a cluster: Ray's GCS key-value store, not the Serve config.

KubeRay's RayService re-submits its `serveConfigV2` (`PUT /api/serve/applications/`) whenever its cache
of it is empty (an operator restart) or the custom resource changes; anything the config carries is then
reset to what the chart rendered. So the in-cluster placement controller
(`deployments.placement_controller`) keeps the placement here, beside Serve's own checkpoints in the
GCS, and the app builder (`deployments.app.build_app`) reads it whenever it builds the app: a
re-submitted config rebuilds the app with the current placement, not the chart's empty one. The GCS
outlives any worker node (and, with GCS fault tolerance, the head), which a detached actor would not.

`ray.experimental.internal_kv` is what Ray's own libraries (Serve, Tune, the job manager) keep such
state in; it needs a connected Ray worker or driver.
"""

from __future__ import annotations

import json
import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError

NAMESPACE = b"expertmesh"
KEY = b"placement"


class StoredPlacement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    placement: dict[str, list[str]] = Field(description="expert -> the nodes (expertmesh.io/node) holding it")
    executors: dict[str, dict] = Field(default_factory=dict, description="node -> its expert hosts' sizing "
                                                                         "(deployments.config.ExecutorPlan fields)")
    revision: int = Field(ge=1, description="1 for the first plan, +1 for every re-plan applied")
    reason: str = Field("", description="why this placement was made (the controller's log line)")
    written_at_s: float = Field(0.0, description="wall-clock time it was written (time.time())")


def read() -> StoredPlacement | None:
    """The stored placement; None when none was stored (or Ray is not connected, or the entry is unreadable)."""
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return None
    raw = internal_kv._internal_kv_get(KEY, namespace=NAMESPACE)
    if not raw:
        return None
    try:
        return StoredPlacement.model_validate_json(raw)
    except ValidationError:
        return None


def write(placement: dict[str, list[str]], revision: int, reason: str = "",
          executors: dict[str, dict] | None = None) -> StoredPlacement:
    """Store `placement` (and its executor sizing) as `revision`, overwriting the previous one; returns it."""
    from ray.experimental import internal_kv

    stored = StoredPlacement(placement={e: list(ns) for e, ns in sorted(placement.items())}, revision=revision,
                             executors=executors or {}, reason=reason, written_at_s=time.time())
    internal_kv._internal_kv_put(KEY, json.dumps(stored.model_dump()).encode(), overwrite=True, namespace=NAMESPACE)
    return stored

