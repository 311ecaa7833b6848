"""Where a running app's live-change state lives: Ray's GCS key-value store, beside the placement.

Two entries, in the namespace `cluster.placement_store` uses:
- the rollout state (`cluster.rollout.RolloutState`): which spec revisions are served. The app builder reads it on
  every build, so a re-plan (the placement controller's redeploy, in the driver or in the cluster) keeps the
  revisions a rollout applied, and a rebuilt app keeps serving them;
- the app's build arguments (`deployments.config.AppArgs`, as JSON), written when `expertmesh serve` deploys it: what
  `expertmesh rollout`, a separate process, rebuilds the app from.

Both need a connected Ray driver or worker (`ray.experimental.internal_kv`, as Serve keeps its own checkpoints).
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from expertmesh.cluster.placement_store import NAMESPACE
from expertmesh.cluster.rollout import RolloutState

ROLLOUT_KEY = b"rollout"
APP_ARGS_KEY = b"app_args"


def _get(key: bytes) -> bytes | None:
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return None
    return internal_kv._internal_kv_get(key, namespace=NAMESPACE) or None


def _put(key: bytes, value: bytes) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=NAMESPACE)


def read() -> RolloutState:
    """The stored rollout state; the app as built (revision 0) when none is stored or Ray is not connected."""
    raw = _get(ROLLOUT_KEY)
    if not raw:
        return RolloutState()
    try:
        return RolloutState.model_validate_json(raw)
    except ValidationError:
        return RolloutState()


def write(state: RolloutState) -> None:
    _put(ROLLOUT_KEY, state.model_dump_json().encode())


def clear() -> None:
    """Forget the rollout (a fresh deploy of the app starts from its built spec)."""
    _put(ROLLOUT_KEY, RolloutState().model_dump_json().encode())


def read_app_args() -> dict | None:
    """The build arguments of the running app (JSON of `AppArgs`), or None when no app was deployed by `serve`."""
    raw = _get(APP_ARGS_KEY)
    return json.loads(raw) if raw else None


def write_app_args(args: dict) -> None:
    _put(APP_ARGS_KEY, json.dumps(args).encode())
