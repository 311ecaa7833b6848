"""The Serve application builder: spec -> one deployment per expert, the router, the ingress.

`build_app(args)` is the `import_path` target of the Serve config (`serve deploy serve.yaml`,
KubeRay's serveConfigV2) and of `expertmesh serve`. Deployment options come from
`deployments.config.app_options` (the spec, the settings and a current profile), the same function
that writes the config file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray.serve import Application

from expertmesh.deployments.config import INGRESS_DEPLOYMENT, ROUTER_DEPLOYMENT, AppArgs, app_options, executor_name
from expertmesh.deployments.auth import TokenTable
from expertmesh.deployments.expert import ExpertDeployment
from expertmesh.deployments.ingress import IngressDeployment
from expertmesh.deployments.router import RouterDeployment
from expertmesh.experts.spec import load_spec


def build_app(args: dict | AppArgs) -> Application:
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    spec = load_spec(a.spec, zoo_root=Path(a.zoo))  # checkpoints must exist before any replica starts
    TokenTable.load(a.tokens_file)  # fail here, with the fix, rather than in every ingress replica
    opts = app_options(spec, a, warn=logging.getLogger("ray.serve").warning)  # profile applied when current
    experts = {e.name: ExpertDeployment.options(**opts[e.name]).bind(a.spec, e.name, a.zoo) for e in spec.experts}
    timeout_s = a.settings.expert_timeout_s
    homes = {e: nodes[0] for e, nodes in (a.placement or {}).items() if nodes}
    executors = {node: RouterDeployment.options(**opts[executor_name(node)]).bind(a.spec, experts, timeout_s, homes)
                 for node in sorted(set(homes.values()) | {n for ns in (a.placement or {}).values() for n in ns})}
    router = RouterDeployment.options(**opts[ROUTER_DEPLOYMENT]).bind(a.spec, experts, timeout_s, homes, executors)
    return IngressDeployment.options(**opts[INGRESS_DEPLOYMENT]).bind(a.spec, a.tokens_file, router)
