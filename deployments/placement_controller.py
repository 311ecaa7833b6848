"""The placement controller inside the cluster: a one-replica `Placement` deployment on the head node.

For config deploys (`serve deploy`, KubeRay's RayService), where no `expertmesh serve` process stays
up to re-plan. Glue around `cluster.controller.PlacementController` (the pure re-plan step and its
poll loop), with two changes of where things live:

- the placement is stored in Ray's GCS (`cluster.placement_store`), and the app builder reads it, so
  a config re-submitted unchanged (KubeRay does so after an operator restart) rebuilds the app with the
  running placement instead of the chart's empty one;
- a plan is applied by raising `args.placement_revision` in the app's deployed config and submitting
  it through the dashboard's REST API (`PUT /api/serve/applications/`, what KubeRay itself calls):
  Serve rebuilds the app with the stored placement - a `Host-<node>` pinned to each planned node, the
  hosts of nodes that left the plan removed. Serve versions a config-deployed app's deployments by the
  config's args, so the rebuild rolls every replica (this one too: its successor reads the store).

With no stored placement the first poll sees every node as new and plans (a `node_joined` re-plan);
until then one unpinned `Host` serves every expert. It plans every CoE the app serves together
(`cluster.served`: the spec and each `--coe`, by request share), and sizes each node's expert hosts
(`cluster.memory_model`) when `args.profile` has a current entry for every expert of the app's spec (another CoE's
unprofiled experts are estimated from the profiled ones); else it plans from the checkpoints (every cost estimated
from its size; no sizing: the settings' replicas, the node's memory).
`status()` (GET /v1/placement on the ingress) says what runs and why.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

from ray import serve
from ray._private import ray_constants
from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
from ray.experimental import internal_kv

from expertmesh.cluster import placement_store
from expertmesh.cluster.controller import PlacementController, plan_on_inventory
from expertmesh.cluster.local import describe
from expertmesh.cluster.observed import UsageWatch
from expertmesh.cluster.placement import Plan
from expertmesh.cluster.prometheus import scrape_targets
from expertmesh.cluster.served import served_demand
from expertmesh.deployments.config import APP_NAME, AppArgs
from expertmesh.errors import FailedPrecondition, Unavailable
from expertmesh.experts.spec import load_spec
from expertmesh.profiler.store import ProfileStore, UsageProfile

logger = logging.getLogger("ray.serve")
APPLICATIONS_PATH = "/api/serve/applications/"


def ray_auth_headers() -> dict[str, str]:
    """The header a call to the dashboard needs when the cluster uses Ray's token authentication (KubeRay's
    `authOptions.mode: token` gives every pod RAY_AUTH_MODE=token and RAY_AUTH_TOKEN); empty when it does not."""
    return dict(get_auth_headers_if_auth_enabled({}))


def dashboard_url() -> str:
    """The cluster's dashboard (its REST API), as the head registered it in the GCS: where `ray.util.state` and the
    job client find it too."""
    address = internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    if not address:
        raise Unavailable("the cluster's dashboard is not registered in the GCS", fix="start the head with the dashboard "
                          "(KubeRay does), or set settings.placement_dashboard_url")
    address = address.decode()
    return address if address.startswith("http") else "http://" + address


def resubmit(dashboard_url: str, revision: int, app_name: str = APP_NAME, timeout_s: float = 30.0) -> None:
    """Submit the running declarative config again with `args.placement_revision = revision` (every other app and
    option as deployed), so Serve rebuilds `app_name`; raises when the app was not deployed from a config."""
    auth = ray_auth_headers()
    get = urllib.request.Request(dashboard_url.rstrip("/") + APPLICATIONS_PATH, headers=auth)
    with urllib.request.urlopen(get, timeout=timeout_s) as r:
        details = json.load(r)
    apps = {name: a.get("deployed_app_config") for name, a in (details.get("applications") or {}).items()}
    if not apps.get(app_name):
        raise FailedPrecondition(f"application {app_name!r} was not deployed from a config, so a plan cannot be applied "
                                 "by re-submitting it", field="settings.placement_controller",
                                 fix="deploy with `serve deploy` or KubeRay, or use `expertmesh serve --replan`")
    apps[app_name] = {**apps[app_name], "args": {**apps[app_name]["args"], "placement_revision": revision}}
    body = {"applications": [c for c in apps.values() if c],
            **{k: details[k] for k in ("proxy_location", "http_options", "grpc_options", "target_capacity")
               if details.get(k) is not None}}
    req = urllib.request.Request(dashboard_url.rstrip("/") + APPLICATIONS_PATH, data=json.dumps(body).encode(),
                                 method="PUT", headers={"Content-Type": "application/json", **auth})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        if r.status >= 300:
            raise Unavailable(f"the dashboard refused the re-submitted config ({r.status})", fix="see its log")


@serve.deployment
class PlacementControllerDeployment:
    def __init__(self, app_args: dict) -> None:
        a = AppArgs.model_validate(app_args)
        s = a.settings
        self.spec = spec = load_spec(a.spec, zoo_root=Path(a.zoo))
        store = ProfileStore.load(Path(a.profile)) if a.profile else None
        demand = served_demand(a.spec, Path(a.zoo), a.coes, store, s.expert_num_gpus, s.coe_request_shares,
                               warn=logger.warning)
        measured = {e.name for e in spec.experts} <= demand.profiled
        self.source = "profile" if measured else "checkpoints"
        if not measured:  # costs compared with one another only: every expert from its checkpoint alike
            demand = served_demand(a.spec, Path(a.zoo), a.coes, None, s.expert_num_gpus, s.coe_request_shares,
                                   usage=demand.coes[0].usage)
        rps = s.placement_requests_per_s

        def planner(u: UsageProfile, cluster: dict, current: dict[str, list[str]]) -> Plan:
            result = plan_on_inventory(demand, rps, u, cluster, current, host_num_cpus=s.host_num_cpus,
                                       torch_threads=s.torch_threads, dedicate_min_busy=s.dedicate_min_busy,
                                 components_per_request=s.placement_components_per_request)
            if not measured:
                result.executors = {}  # costs estimated from checkpoints: no sizing (the settings' replicas)
            return result

        self.dashboard_url = s.placement_dashboard_url or dashboard_url()
        stored = placement_store.read()
        self.revision = stored.revision if stored else 0
        self.log: list[str] = []
        self.controller = PlacementController(
            "auto", demand, demand.usage, rps,
            {e: ns for e, ns in stored.placement.items() if e in demand.keys} if stored else {}, apply=self._apply,
            poll_s=s.placement_poll_s, watch=UsageWatch(scrape_targets), log=self._log,
            read_cluster=lambda: describe("auto"), planner=planner,
            executors=stored.executors if stored else None)
        self.controller.start()
        self._log(f"started (planning from the {self.source}; stored placement: "
                  f"{'revision %d' % self.revision if stored else 'none'}; applying through {self.dashboard_url})")

    def __del__(self) -> None:
        self.controller.stop_event.set()

    def _log(self, message: str) -> None:
        logger.info("placement controller: %s", message)
        self.log = (self.log + [message])[-20:]

    def _apply(self, placement: dict[str, list[str]], executors: dict[str, dict]) -> None:
        """Store the new placement and its pooled hosts, then make Serve rebuild the app with them; a failure leaves
        the revision as it was (the controller keeps its old state and tries again at the next poll)."""
        revision = self.revision + 1
        placement_store.write(placement, revision, reason=self.log[-1] if self.log else "", executors=executors)
        resubmit(self.dashboard_url, revision)
        self.revision = revision

    def status(self) -> dict:
        stored = placement_store.read()
        return {"revision": stored.revision if stored else 0, "placement": stored.placement if stored else {},
                "reason": stored.reason if stored else "", "executors": stored.executors if stored else {},
                "planned_from": self.source, "replans": [k.value for k, _ in self.controller.replans],
                "log": self.log[-10:]}
