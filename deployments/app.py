"""The Serve application builder: spec -> one deployment per expert, the router, the ingress.

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

from expertmesh.deployments.config import INGRESS_DEPLOYMENT, ROUTER_DEPLOYMENT, AppArgs, app_options, executor_name
from expertmesh.deployments.auth import TokenTable
from expertmesh.deployments.expert import ExpertDeployment
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
    experts = {e.name: versioned(ExpertDeployment, opts[e.name], a.spec, e.name, a.zoo).bind(a.spec, e.name, a.zoo)
               for e in spec.experts}
    timeout_s = a.settings.expert_timeout_s
    # the placement reaches the routers as user_config; their constructor arguments (and so their versions) do not
    # change with it, so a re-plan reconfigures them in place. The executors are bound only to be part of the app.
    executors = {node: versioned(RouterDeployment, opts[executor_name(node)], a.spec, experts, timeout_s).bind(
        a.spec, experts, timeout_s) for node in opts[ROUTER_DEPLOYMENT]["user_config"]["executor_nodes"]}
    router = versioned(RouterDeployment, opts[ROUTER_DEPLOYMENT], a.spec, experts, timeout_s).bind(
        a.spec, experts, timeout_s, executors)
    board_limits = {"max_components": a.settings.board_max_components,
                    "max_in_flight": a.settings.board_max_in_flight}
    return versioned(IngressDeployment, opts[INGRESS_DEPLOYMENT], a.spec, a.tokens_file, router, board_limits).bind(
        a.spec, a.tokens_file, router, board_limits)
