"""The Serve application builder: spec -> the expert host(s), the router, the ingress.

`build_app(args)` is the `import_path` target of the Serve config (`serve deploy serve.yaml`,
KubeRay's serveConfigV2) and of `expertmesh serve`. Deployment options come from
`deployments.config.app_options` (the spec, the settings and a current profile), the same function
that writes the config file.

Every deployment gets a version derived from its constructor arguments (and this process), so a
redeploy from the same `expertmesh serve` (the placement controller applying a new plan) restarts
only the deployments whose arguments or actor options changed, and reconfigures the rest in place;
`serve.run` otherwise gives each deployment a fresh random version, restarting every replica.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from pathlib import Path

from ray.serve import Application
from ray.serve.deployment import Deployment

from expertmesh.deployments.auth import TokenTable
from expertmesh.deployments.config import (HOST_DEPLOYMENT, INGRESS_DEPLOYMENT, ROUTER_DEPLOYMENT, AppArgs, app_options,
                                           host_name)
from expertmesh.deployments.host import ExpertHostDeployment
from expertmesh.deployments.ingress import IngressDeployment
from expertmesh.deployments.router import RouterDeployment
from expertmesh.experts.spec import load_spec


_PROCESS = secrets.token_hex(8)  # another serve process (maybe newer code) restarts everything


def versioned(deployment: Deployment, options: dict, *init_args) -> Deployment:
    """`deployment` with `options` and a version that changes only when its name, this process or its constructor
    arguments (handles by deployment name) change."""
    def plain(x):
        if isinstance(x, Application):
            return f"deployment:{x._bound_deployment.name}"
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in sorted(x.items())}
        return x
    digest = hashlib.sha256(json.dumps([_PROCESS, options["name"], [plain(a) for a in init_args]],
                                       sort_keys=True, default=str).encode()).hexdigest()[:16]
    return deployment.options(**options).options(version=digest, _internal=True)  # Serve's own versioning hook


def build_app(args: dict | AppArgs) -> Application:
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    spec = load_spec(a.spec, zoo_root=Path(a.zoo))  # checkpoints must exist before any replica starts
    TokenTable.load(a.tokens_file)  # fail here, with the fix, rather than in every ingress replica
    opts = app_options(spec, a, warn=logging.getLogger("ray.serve").warning)  # profile applied when current
    s = a.settings
    # which experts a host holds, and each expert's home, reach the hosts and the router as user_config: their
    # constructor arguments (and so their versions) do not change with a re-plan, which reconfigures them in place
    nodes = opts[ROUTER_DEPLOYMENT]["user_config"]["host_nodes"]
    names = {node: host_name(node) for node in nodes} if nodes else {"": HOST_DEPLOYMENT}
    hosts = {node: versioned(ExpertHostDeployment, opts[name], a.spec, a.zoo, s.torch_threads).bind(
        a.spec, a.zoo, s.torch_threads) for node, name in names.items()}
    router_args = (a.spec, a.zoo, s.expert_timeout_s, s.torch_threads)
    router = versioned(RouterDeployment, opts[ROUTER_DEPLOYMENT], *router_args).bind(  # hosts: not in the version
        a.spec, a.zoo, hosts, s.expert_timeout_s, s.torch_threads)
    ingress_args = (a.spec, a.tokens_file, router,
                    {"max_components": s.board_max_components, "max_in_flight": s.board_max_in_flight},
                    {"max_size": s.route_batch_max_size, "wait_s": s.route_batch_wait_s}, s.max_in_flight_components)
    return versioned(IngressDeployment, opts[INGRESS_DEPLOYMENT], *ingress_args).bind(*ingress_args)
