"""Where a running app's live-change state lives: Ray's GCS key-value store, beside the placement.

Three entries, in the namespace `cluster.placement_store` uses:
- the rollout state (`cluster.rollout.RolloutState`) of the app's own CoE (`--spec`), and that of every other CoE it
  serves (`--coe`) by spec name: which spec revisions are served. The app builder reads them on every build, so a
  re-plan (the placement controller's redeploy, in the driver or in the cluster) keeps the revisions a rollout
  applied, and a rebuilt app keeps serving them;
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
COE_ROLLOUTS_KEY = b"rollout_coes"  # spec name -> RolloutState of another CoE the app serves
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


def read(coe: str = "") -> RolloutState:
    """The stored rollout state of the app's own CoE ("") or of the other CoE named `coe`; the CoE as deployed
    (revision 0) when none is stored or Ray is not connected."""
    if coe:
        return read_coes().get(coe, RolloutState())
    raw = _get(ROLLOUT_KEY)
    if not raw:
        return RolloutState()
    try:
        return RolloutState.model_validate_json(raw)
    except ValidationError:
        return RolloutState()


def read_coes() -> dict[str, RolloutState]:
    """The other CoEs' rollout states, by spec name (those never changed are absent)."""
    raw = _get(COE_ROLLOUTS_KEY)
    try:
        return {name: RolloutState.model_validate(s) for name, s in json.loads(raw).items()} if raw else {}
    except (ValueError, ValidationError):
        return {}


def write(state: RolloutState, coe: str = "") -> None:
    if not coe:
        _put(ROLLOUT_KEY, state.model_dump_json().encode())
        return
    states = read_coes() | {coe: state}
    _put(COE_ROLLOUTS_KEY, json.dumps({n: s.model_dump(mode="json") for n, s in states.items()}).encode())


def clear() -> None:
    """Forget every rollout (a fresh deploy of the app starts from its specs)."""
    _put(ROLLOUT_KEY, RolloutState().model_dump_json().encode())
    _put(COE_ROLLOUTS_KEY, b"{}")


def read_app_args() -> dict | None:
    """The build arguments of the running app (JSON of `AppArgs`), or None when no app was deployed by `serve`."""
    raw = _get(APP_ARGS_KEY)
    return json.loads(raw) if raw else None


def write_app_args(args: dict) -> None:
    _put(APP_ARGS_KEY, json.dumps(args).encode())
