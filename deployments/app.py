"""The Serve application builder: spec -> the expert host(s), the router, the ingress.

`build_app(args)` is the `import_path` target of the Serve config (`serve deploy serve.yaml`,
KubeRay's serveConfigV2) and of `expertmesh serve`. Deployment options come from
`deployments.config.app_options` (the spec, the settings and a current profile), the same function
that writes the config file.

Every deployment gets a version derived from its constructor arguments, the serving code and the zoo's
checkpoints, so a redeploy through Serve's imperative API (`expertmesh serve --replan` applying a new
plan) restarts only the deployments whose arguments, code or checkpoints changed, and reconfigures the
rest in place; `serve.run` otherwise gives each deployment a fresh random version, restarting every
replica. (A config deploy - `serve deploy`, KubeRay - replaces these versions by the app's code
version, a hash of the config's import path and args: every rebuild there restarts every replica.)

The placement: `args.placement` when given (`expertmesh serve --plan`); else, with
`settings.placement_controller`, the one the in-cluster controller stored in the GCS
(`cluster.placement_store`), so a re-submitted config keeps the running placement; else none.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
from pathlib import Path

from ray.serve import Application
from ray.serve.deployment import Deployment

from expertmesh.cluster import placement_store, rollout_store
from expertmesh.cluster.rollout import RolloutState
from expertmesh.deployments.auth import TokenTable
from expertmesh.deployments.config import (HOST_DEPLOYMENT, INGRESS_DEPLOYMENT, PLACEMENT_DEPLOYMENT, ROUTER_DEPLOYMENT,
                                           AppArgs, host_deployments)
from expertmesh.deployments.host import ExpertHostDeployment
from expertmesh.deployments.ingress import IngressDeployment
from expertmesh.deployments.placement_controller import PlacementControllerDeployment
from expertmesh.deployments.router import RouterDeployment
from expertmesh.deployments.served import keyed_coes, served_coes, served_options, served_placement
from expertmesh.experts.spec import CoESpec, load_spec, resolve_checkpoint


SERVING_PACKAGES = ("expertmesh", "expertmesh.v1", "expertmesh.experts", "expertmesh.experts.pcb_aoi",
                    "expertmesh.router", "expertmesh.profiler", "expertmesh.cluster", "expertmesh.deployments")


@functools.cache
def code_fingerprint() -> str:
    """A digest of the serving code (every module of the packages a replica imports): new code restarts replicas."""
    h = hashlib.sha256()
    for package in SERVING_PACKAGES:
        for root in importlib.import_module(package).__path__:
            for f in sorted(Path(root).glob("*.py")):
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def zoo_fingerprint(specs: list[CoESpec], zoo: str) -> str:
    """A digest of the served specs' checkpoint files (path, size, modification time): retrained experts restart
    replicas. Only the built specs' (`--spec`, `--coe`): a new revision's checkpoints (`expertmesh rollout`) reach
    running replicas as a reconfigure, not a restart."""
    h = hashlib.sha256()
    for spec in specs:
        for e in sorted(spec.experts, key=lambda e: e.name):
            for f in sorted(resolve_checkpoint(e, Path(zoo)).rglob("*.safetensors")):
                st = f.stat()
                h.update(f"{spec.name}:{e.name}:{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def stored_rollouts(a: AppArgs) -> tuple[RolloutState, dict[str, RolloutState]]:
    """The live-change states in the GCS (the app's own CoE's, the other CoEs' by name) when they belong to this app
    (the one `expertmesh serve` stored with the same spec, zoo and CoEs), else none: a config deploy over an old
    cluster never inherits another app's revisions."""
    stored = rollout_store.read_app_args() or {}
    if (stored.get("spec"), stored.get("zoo"), stored.get("coes") or []) != (a.spec, a.zoo, a.coes):
        return RolloutState(), {}
    return rollout_store.read(), rollout_store.read_coes()


def _versioned(deployment: Deployment, options: dict, *init_args, fingerprint: str = "") -> Deployment:
    """`deployment` with `options` and a version that changes only when its name, its constructor arguments (handles
    by deployment name) or `fingerprint` (the code and checkpoints) change."""
    def plain(x):
        if isinstance(x, Application):
            return f"deployment:{x._bound_deployment.name}"
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in sorted(x.items())}
        return x
    digest = hashlib.sha256(json.dumps([fingerprint, options["name"], [plain(a) for a in init_args]],
                                       sort_keys=True, default=str).encode()).hexdigest()[:16]
    return deployment.options(**options).options(version=digest, _internal=True)  # Serve's own versioning hook


def build_app(args: dict | AppArgs) -> Application:
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    spec = load_spec(a.spec, zoo_root=Path(a.zoo))  # checkpoints must exist before any replica starts
    TokenTable.load(a.tokens_file)  # fail here, with the fix, rather than in every ingress replica
    log = logging.getLogger("ray.serve")
    keyed = keyed_coes(a)  # the other CoEs in serving keys (their checkpoints hashed once)
    if a.placement is None and a.settings.placement_controller and (stored := placement_store.read()) is not None:
        log.info("building with the stored placement, revision %d (%s)", stored.revision, stored.reason)
        placement, dropped = served_placement(stored.placement, spec, keyed)
        if dropped:
            log.warning("the stored placement names experts this app does not serve (%s): left out until the "
                        "placement controller plans again", ", ".join(dropped))
        a = AppArgs.model_validate({**a.model_dump(), "placement": placement, "executors": stored.executors or None})
    coes = served_coes(spec, a)  # the other CoEs' specs, checked once
    rollout, coe_rollouts = stored_rollouts(a)
    opts = served_options(spec, a, warn=log.warning, rollout=rollout, coes=coes,  # profile applied if current
                          coe_rollouts=coe_rollouts, keyed=keyed)
    s = a.settings
    versioned = functools.partial(_versioned, fingerprint=code_fingerprint() + zoo_fingerprint(
        [spec, *coes.values()], a.zoo))
    # which experts a host holds, and each expert's home, reach the hosts and the router as user_config: their
    # constructor arguments (and so their versions) do not change with a re-plan, which reconfigures them in place
    names = host_deployments(opts[ROUTER_DEPLOYMENT]["user_config"]) or {"": HOST_DEPLOYMENT}
    hosts = {key: versioned(ExpertHostDeployment, opts[name], a.spec, a.zoo, s.torch_threads).bind(
        a.spec, a.zoo, s.torch_threads) for key, name in names.items()}
    router_args = (a.spec, a.zoo, s.expert_timeout_s, s.torch_threads)
    router = versioned(RouterDeployment, opts[ROUTER_DEPLOYMENT], *router_args).bind(  # hosts: not in the version
        a.spec, a.zoo, hosts, s.expert_timeout_s, s.torch_threads)
    ingress_args = (a.spec, a.tokens_file, router,
                    {"max_components": s.board_max_components, "max_in_flight": s.board_max_in_flight},
                    {"max_size": s.route_batch_max_size, "wait_s": s.route_batch_wait_s}, s.max_in_flight_components,
                    {"metadata_max_entries": s.metadata_max_entries, "metadata_max_value_chars": s.metadata_max_value_chars,
                     "decode_threads": s.decode_threads, "request_timeout_s": s.request_timeout_s})
    ingress = versioned(IngressDeployment, opts[INGRESS_DEPLOYMENT], *ingress_args)
    if not s.placement_controller:
        return ingress.bind(*ingress_args)
    controller_args = (a.model_copy(update={"placement": None, "executors": None, "placement_revision": 0}
                                    ).model_dump(mode="json"),)
    controller = versioned(PlacementControllerDeployment, opts[PLACEMENT_DEPLOYMENT], *controller_args)
    return ingress.bind(*ingress_args, controller.bind(*controller_args))  # bound here so Serve deploys it
