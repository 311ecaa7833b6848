"""Serve settings and every deployment's options, built from a spec: data, no cluster.

`deployment_options` is the one source of every deployment's options (autoscaling, batching,
fractional CPU/GPU, queue limits), and `proxy_options` of the HTTP and gRPC proxies': the app builder
and `expertmesh serve` apply them in code, and `deployments.served.build_serve_config` writes them into the config file
that `serve deploy` and KubeRay (the Helm chart's RayService, as its serveConfigV2) run, so the two
can never disagree. `app_profiles` is the one choice of profile entries: those of the device each
expert runs on, for serving and for the placement controller alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from expertmesh.cluster.demand import ServedCoE, joint_usage
from expertmesh.cluster.labels import NODE_LABEL
from expertmesh.errors import InvalidArgument
from expertmesh.experts.spec import CoESpec
from expertmesh.profiler.serving_profiles import serving_device, serving_devices, usable_profiles
from expertmesh.profiler.store import ExpertProfile, ProfileStore
from expertmesh.profiler.usage import from_spec

APP_NAME = "expertmesh"
ROUTER_DEPLOYMENT = "Router"
INGRESS_DEPLOYMENT = "Ingress"
HOST_DEPLOYMENT = "Host"  # the expert host; with a placement one per planned node: Host-<node>
DEDICATED_DEPLOYMENT = "Expert"  # a hot expert's own deployment on a planned node: Expert-<expert>-<node>
PLACEMENT_DEPLOYMENT = "Placement"  # the in-cluster placement controller (settings.placement_controller)
GRPC_SERVICER = "expertmesh.deployments.grpc_service.add_inspection_service"  # tolerant parsing: see there
IMPORT_PATH = "expertmesh.deployments.app:build_app"


class ServeSettings(BaseModel):
    """How the CoE is served (ports, batching, queues, replica sizes). Every field has a production default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=1, le=65535)
    grpc_max_message_mib: float = Field(
        64.0, gt=0, le=2047, description="the largest gRPC message Serve's proxy takes (an Inspect or a whole "
                                          "InspectBoard request); larger ones get RESOURCE_EXHAUSTED from gRPC before "
                                          "they are buffered. Serve reads it from RAY_SERVE_GRPC_MAX_MESSAGE_SIZE in "
                                          "the proxy's process: `expertmesh serve` sets it for the Ray it starts; a "
                                          "cluster's nodes need it in their environment (the Helm chart sets it)")
    route_batch_max_size: int = Field(64, ge=1, le=4096, description="requests the ingress sends the router in one call")
    route_batch_wait_s: float = Field(0.005, ge=0, le=1, description="how long the ingress waits to fill a batch")
    max_in_flight_components: int = Field(
        256, ge=1, description="components in flight per ingress replica; past it requests and boards are refused "
                               "at once with RESOURCE_EXHAUSTED (HTTP 429) instead of queueing past their deadline")
    host_num_cpus: float = Field(1.0, gt=0, le=64, description="logical CPUs per expert host replica")
    host_replicas: int = Field(1, ge=1, description="expert host replicas at start (per planned node with a plan)")
    host_max_replicas: int = Field(2, ge=1, description="the autoscaler's bound on expert host replicas (per node)")
    torch_threads: int = Field(1, ge=1, le=256, description="torch threads per host and router replica")
    expert_num_gpus: float = Field(0.0, ge=0, le=8, description="per host replica, where the spec's experts run on cuda")
    max_ongoing_requests: int = Field(32, ge=1, description="batched calls a host or router replica takes at once")
    max_queued_requests: int = Field(256, ge=-1, description="router and host handles; -1: unbounded")
    expert_timeout_s: float = Field(30.0, gt=0, description="an expert host call slower than this fails its requests "
                                                            "(UNAVAILABLE); a request's own deadline comes first")
    request_timeout_s: float = Field(60.0, gt=0, description="the proxies' bound on a request, and the ingress's "
                                                             "deadline when the client sends a longer one or none "
                                                             "(x-expertmesh-timeout-seconds)")
    metadata_max_entries: int = Field(16, ge=0, le=1024, description="entries in a request's metadata map; more: "
                                                                     "INVALID_ARGUMENT")
    metadata_max_value_chars: int = Field(256, ge=1, le=65536, description="characters of one metadata value")
    decode_threads: int = Field(2, ge=1, le=64, description="threads per ingress replica that decode images (off "
                                                            "the event loop)")
    access_log: bool = Field(False, description="Serve's per-request access log lines (proxies and replicas); they "
                                                "cost CPU on every request, so they are off unless asked for")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    router_replicas: int = Field(1, ge=1)
    ingress_replicas: int = Field(1, ge=1)
    ingress_max_ongoing_requests: int = Field(512, ge=1, description="per ingress replica; InspectBoard counts once")
    board_max_components: int = Field(512, ge=1, description="a board with more components is refused (INVALID_ARGUMENT)")
    board_max_in_flight: int = Field(64, ge=1, description="components of one board inspected at once")
    expert_device_idle_s: float | None = Field(
        None, gt=0, description="an expert replica idle this long moves its weights to host memory; none: never")
    expert_host_idle_s: float | None = Field(
        None, gt=0, description="an expert replica idle this long drops its weights to disk; none: never")
    front_on_head: bool = Field(
        True, description="with a placement, run the ingress and the front router on the head node (it holds Ray's "
                          "GCS and Serve's controller: losing it loses the cluster anyway), so losing a worker never "
                          "drops a request at the front; false when the head takes no replicas (num-cpus 0)")
    max_surge_percent: int = Field(
        100, ge=0, le=100, description="a redeploy starts replacement replicas before it stops the old ones "
                                       "(Serve's rolling update surge); 0: stop first")
    pool_device_budget_mib: float | None = Field(
        None, gt=0, description="device memory an expert host replica fills with experts; none: what the node offers "
                                "(its expertmesh_memory_mib resource, else the whole device)")
    pool_host_budget_mib: float | None = Field(
        None, gt=0, description="host memory an expert host replica keeps expert copies in; none: what the node offers")
    pool_arrange: Literal["coserve", "fcfs"] = Field(
        "coserve", description="order of a host's queued calls: coserve (same expert together, resident first, the "
                               "oldest after pool_max_wait_s) or fcfs (arrival order)")
    pool_evict: Literal["coserve", "lru", "fifo"] = Field(
        "coserve", description="which experts leave a full device: coserve (orphaned downstream experts, then the "
                               "least used), lru or fifo")
    pool_max_wait_s: float = Field(
        0.5, gt=0, le=60, description="a call queued this long goes next on its host, whatever is resident (the bound "
                                      "on how long grouping calls by expert may delay one)")
    pool_prefetch: bool = Field(True, description="load likely downstream experts while their upstream runs, "
                                                  "into free device memory")
    host_request_router: Literal["assign", "pow2"] = Field(
        "assign", description="how handles pick a host replica: assign (predicted completion time, with switch "
                              "costs: deployments.assign_router) or pow2 (Serve's default, power of two choices)")
    placement_controller: bool = Field(
        False, description="run the placement controller inside the app (a `Placement` deployment on the head): it "
                           "plans on the live nodes, keeps the placement in Ray's GCS and re-plans on node loss, join "
                           "or drift; for config deploys (`serve deploy`, KubeRay), where re-submitting the config "
                           "keeps the running placement. `expertmesh serve --replan` runs it in the driver instead")
    placement_poll_s: float = Field(5.0, gt=0, le=600, description="how often the in-cluster controller reads the nodes")
    placement_requests_per_s: float = Field(20.0, gt=0, description="the request rate the in-cluster controller "
                                                                    "plans for")
    placement_components_per_request: int = Field(
        1, ge=1, description="components a request carries (boards: many): the shape of the requests the placement "
                             "controllers' memory model simulates when it sizes each node's pooled hosts")
    dedicate_min_busy: float = Field(
        0.5, gt=0, description="the in-cluster controller gives an expert its own autoscaled deployment when its "
                               "planned calls keep this many replicas busy (cluster.dedicate); the rest share pools")
    placement_dashboard_url: str | None = Field(
        None, description="Ray dashboard the in-cluster controller applies plans through (PUT /api/serve/applications/); "
                          "none: the cluster's own")
    coe_request_shares: dict[str, float] = Field(
        default_factory=dict, description="each served CoE's share of the requests (spec name -> relative share; a CoE "
                                          "not named: 1), what the placement plans several CoEs for and the pools' "
                                          "eviction ranks by; observed traffic replaces it at a drift re-plan")
    ingress_max_queued_requests: int = Field(
        256, ge=-1, description="requests waiting for an ingress replica; past it stations get RESOURCE_EXHAUSTED "
                                "(HTTP 503); -1: unbounded")

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        bad = {n: v for n, v in self.coe_request_shares.items() if not v > 0}
        if bad:
            raise ValueError(f"coe_request_shares {bad} are not positive; give each CoE a share > 0 (relative: 2 and 1 "
                             f"is two thirds and one third)")
        if self.http_port == self.grpc_port:
            raise ValueError(f"http_port and grpc_port are both {self.http_port}; give them different ports")
        if self.expert_timeout_s >= self.request_timeout_s:
            raise ValueError(f"expert_timeout_s ({self.expert_timeout_s}) is not below request_timeout_s "
                             f"({self.request_timeout_s}): the budgets nest (proxy > ingress > router > expert call); "
                             f"fix: lower expert_timeout_s or raise request_timeout_s")
        if self.host_max_replicas < self.host_replicas:
            raise ValueError(f"host_max_replicas ({self.host_max_replicas}) is below host_replicas "
                             f"({self.host_replicas}); fix: raise host_max_replicas")
        if (self.expert_device_idle_s is not None and self.expert_host_idle_s is not None
                and self.expert_host_idle_s < self.expert_device_idle_s):
            raise ValueError(f"expert_host_idle_s ({self.expert_host_idle_s}) is below expert_device_idle_s "
                             f"({self.expert_device_idle_s}); fix: make expert_host_idle_s at least expert_device_idle_s")
        return self


class DedicatedPlan(BaseModel):
    """A hot expert's own deployment on a node, as the plan chose it (`cluster.dedicate`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    min_replicas: int = Field(ge=1)
    max_replicas: int = Field(ge=1)
    device_budget_bytes: int = Field(gt=0, description="per replica: the expert's weights, always resident")

    @model_validator(mode="after")
    def _bounds(self) -> DedicatedPlan:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas}); "
                             f"fix: write the plan again with `expertmesh plan --json`")
        return self


class ExecutorPlan(BaseModel):
    """One node's expert hosts as the plan sized them: the pool (`cluster.memory_model`; 0 replicas: no pool, every
    expert there is dedicated) - its replicas, each one's device and host budgets, the experts it starts with on the
    device and in host memory - and the dedicated deployments of its hot experts (`cluster.dedicate`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    num_replicas: int = Field(ge=0)
    device_budget_bytes: int = Field(ge=0, description="per pool replica, for resident experts")
    host_budget_bytes: int | None = Field(None, ge=1, description="per pool replica, for host-memory copies; none: what "
                                                                  "the node offers")
    resident: list[str] = Field(default_factory=list, description="experts the pool starts with on the device")
    host: list[str] = Field(default_factory=list, description="experts the pool starts with in host memory only")
    max_wait_s: float | None = Field(None, gt=0, le=60, description="arrange's wait bound the plan chose; none: the "
                                                                    "settings' pool_max_wait_s")
    dedicated: dict[str, DedicatedPlan] = Field(default_factory=dict, description="expert -> its own deployment here")


class AppArgs(BaseModel):
    """Arguments of the Serve application builder (`args:` in the Serve config)."""

    model_config = ConfigDict(extra="forbid")

    spec: str | None = Field(None, description="CoE spec YAML; none: the embedded pcb-aoi")
    zoo: str = Field(description="zoo directory with the checkpoints")
    tokens_file: str = Field(description="YAML of `token: factory_id` lines")
    profile: str | None = Field(None, description="profile store (expertmesh profile); its current entries set "
                                                  "each expert's batch size and autoscaling target")
    placement: dict[str, list[str]] | None = Field(
        None, description="expert -> the nodes (expertmesh.io/node labels) its replicas must run on, from a plan; "
                          "none: the stored one when settings.placement_controller, else unpinned")
    executors: dict[str, ExecutorPlan] | None = Field(
        None, description="planned node -> its expert hosts' replica count and device budget (the plan's executor "
                          "sizing); none: host_replicas..host_max_replicas and the node's memory")
    coes: list[str] = Field(
        default_factory=list, description="more CoE spec files served beside `spec` (checkpoints in the same zoo); a "
                                          "request names its CoE by spec name, else gets its factory's default")
    placement_revision: int = Field(
        0, ge=0, description="the stored placement's revision the app was last built for; the in-cluster controller "
                             "raises it to make Serve rebuild the app with a new placement (leave it at 0)")
    settings: ServeSettings = Field(default_factory=ServeSettings)


def _uses_gpu(spec: CoESpec, settings: ServeSettings) -> bool:
    return any(serving_device(e, settings.expert_num_gpus) == "cuda" for e in spec.experts)


def batch_sizes(spec: CoESpec, profiles: dict[str, ExpertProfile] | None = None,
                others: Sequence[CoESpec] = ()) -> dict[str, int]:
    """Each expert's batch size on a host: its profiled largest useful batch where a current profile has one, else
    the spec's max_batch (`others`: the other CoEs' experts, by serving key)."""
    profiles = profiles or {}
    out = {e.name: e.max_batch for o in reversed(others) for e in o.experts}
    return out | {e.name: profiles[e.name].max_useful_batch if e.name in profiles else e.max_batch for e in spec.experts}


def host_options(name: str, experts: list[str], spec: CoESpec, settings: ServeSettings,
                 profiles: dict[str, ExpertProfile] | None = None, others: Sequence[CoESpec] = ()) -> dict[str, Any]:
    """An expert host deployment: which experts it loads, their batch sizes and residency, in user_config (a
    re-plan reconfigures running hosts: a load, not a new process); autoscaled on batched calls in flight."""
    s = settings
    return {
        "name": name,
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "autoscaling_config": {"min_replicas": s.host_replicas, "initial_replicas": s.host_replicas,
                               "max_replicas": s.host_max_replicas, "target_ongoing_requests": 2.0,
                               "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s},
        "ray_actor_options": {"num_cpus": s.host_num_cpus,
                              "num_gpus": s.expert_num_gpus if any(_uses_gpu(x, s) for x in (spec, *others)) else 0},
        "user_config": {"experts": sorted(experts), "max_batch": batch_sizes(spec, profiles, others),
                        "device_idle_s": s.expert_device_idle_s, "host_idle_s": s.expert_host_idle_s,
                        **pool_config(spec, s, others)},
        **({"request_router_config": {"request_router_class": ASSIGN_ROUTER, "request_routing_stats_period_s": 1.0,
                                      "request_router_kwargs": {"costs": pool_costs(profiles)}}}
           if s.host_request_router == "assign" else {}),
    }


ASSIGN_ROUTER = "expertmesh.deployments.assign_router:AssignRequestRouter"


def served_usage(specs: Sequence[CoESpec], shares: dict[str, float]) -> dict[str, float]:
    """P(a request of the cluster invokes each expert): each CoE's expected mix, weighted by its request share (the
    mixing the placement plans with, `cluster.demand.joint_usage`)."""
    return joint_usage([ServedCoE(s, shares.get(s.name, 1.0), from_spec(s)) for s in specs]).usage


def pool_config(spec: CoESpec, settings: ServeSettings, others: Sequence[CoESpec] = ()) -> dict[str, Any]:
    """A host's memory budgets (bytes; absent: what the node offers), policies and each expert's usage probability
    (the served CoEs' expected mix: what the CoServe eviction ranks by)."""
    s = settings
    mib = {"device_budget_bytes": s.pool_device_budget_mib, "host_budget_bytes": s.pool_host_budget_mib}
    return {**{k: int(v * 2**20) for k, v in mib.items() if v is not None},
            "arrange": s.pool_arrange, "evict": s.pool_evict, "max_wait_s": s.pool_max_wait_s,
            "prefetch": s.pool_prefetch,
            "usage": {e: round(p, 6) for e, p in sorted(served_usage([spec, *others], s.coe_request_shares).items())}}


def pool_costs(profiles: dict[str, ExpertProfile] | None) -> dict[str, list[float]]:
    """expert -> [K ms per item, B ms per batch, switch ms (host memory -> device)] from current profile entries."""
    out = {}
    for name, p in sorted((profiles or {}).items()):
        out[name] = [round(p.fit.k_ms_per_item, 4), round(p.fit.b_ms, 4), round(p.move_ms("host", "device") or 0.0, 4)]
    return out


HEAD_RESOURCE = "node:__internal_head__"  # every Ray head node has 1 of it


def host_name(node: str) -> str:
    return f"{HOST_DEPLOYMENT}-{node}"


def dedicated_name(expert: str, node: str) -> str:
    """The deployment of a hot expert's own replicas on `node` (`cluster.dedicate`)."""
    return f"{DEDICATED_DEPLOYMENT}-{expert}-{node}"


def host_deployments(routing: dict[str, Any]) -> dict[str, str]:
    """The expert hosts of a routing user_config (what `deployment_options` gives the router), by the key the router
    routes with: each planned node's pool under its node, each dedicated deployment under its own name. Empty
    without a placement (the single unpinned `Host`)."""
    keys = {node: host_name(node) for node in routing.get("host_nodes") or []}
    return keys | {name: name for own in (routing.get("dedicated") or {}).values() for name in own.values()}


def pin_to_node(options: dict[str, Any], node: str) -> dict[str, Any]:
    """Pin a deployment's replicas to one node by its `expertmesh.io/node` label."""
    actor = {**options["ray_actor_options"], "label_selector": {NODE_LABEL: node}}
    return {**options, "ray_actor_options": actor}


def sized(options: dict[str, Any], min_replicas: int, max_replicas: int, device_budget_bytes: int,
          plan: ExecutorPlan | None = None) -> dict[str, Any]:
    """A host deployment with the plan's replica bounds (a pool's are fixed: more replicas would not fit the node's
    memory; a dedicated expert's autoscale within what the plan reserved), each replica's device budget and, for a
    pool, its host budget and the tiers it starts with (`plan`)."""
    scaling = {**options["autoscaling_config"], "min_replicas": min_replicas, "initial_replicas": min_replicas,
               "max_replicas": max_replicas}
    user_config = {**options["user_config"], "device_budget_bytes": device_budget_bytes}
    if plan is not None:
        if plan.host_budget_bytes is not None:
            user_config["host_budget_bytes"] = plan.host_budget_bytes
        user_config["warm"] = {"device": list(plan.resident), "host": list(plan.host)}
        if plan.max_wait_s is not None:
            user_config["max_wait_s"] = plan.max_wait_s
    return {**options, "autoscaling_config": scaling, "user_config": user_config}


def deployment_options(spec: CoESpec, settings: ServeSettings, profiles: dict[str, ExpertProfile] | None = None,
                       placement: dict[str, list[str]] | None = None,
                       executors: dict[str, ExecutorPlan] | None = None,
                       others: Sequence[CoESpec] = ()) -> dict[str, dict[str, Any]]:
    """Options of every deployment of the app, by deployment name: the expert host(s), the router, the ingress.

    Without a placement one `Host` deployment holds every expert (the classifier runs in the router). With one,
    each planned node gets a `Host-<node>` pool pinned there, holding the experts the plan puts on that node, and
    each expert the plan dedicates (`executors[node].dedicated`) its own autoscaled `Expert-<expert>-<node>` there
    instead; the router learns each expert's home node and own deployments through user_config (reconfigured in
    place by a re-plan that keeps the set of deployments).

    `others`: the other CoEs served (`--coe`), in serving keys (`experts.revisions`): their experts are hosted, placed
    and dedicated like the spec's, by key (an expert two CoEs share is one key); the classifiers run in the router."""
    specs = [spec, *others]
    in_router = {x.router.expert for x in specs}
    experts = list(dict.fromkeys(e.name for x in specs for e in x.experts if e.name not in in_router))
    unknown = sorted(set(placement or {}) - {e.name for x in specs for e in x.experts})
    if unknown:
        raise InvalidArgument(f"the placement names experts the served CoEs do not have: {', '.join(unknown)}",
                              field="placement", fix="plan with the same spec and --coe specs")
    planned = {e: sorted(nodes) for e, nodes in (placement or {}).items() if nodes and e in experts}
    planned_nodes = sorted({n for nodes in planned.values() for n in nodes})
    executors = executors or {}
    own = {(e, node): d for node, x in executors.items() for e, d in x.dedicated.items() if node in planned.get(e, [])}
    opts: dict[str, dict[str, Any]] = {}
    pool_nodes = []
    for node in planned_nodes:
        held = [e for e in experts if node in planned.get(e, []) and (e, node) not in own]
        if held:
            pool_nodes.append(node)
            opts[host_name(node)] = pin_to_node(host_options(host_name(node), held, spec, settings, profiles, others),
                                                node)
            if (x := executors.get(node)) and x.num_replicas:
                opts[host_name(node)] = sized(opts[host_name(node)], x.num_replicas, x.num_replicas,
                                              x.device_budget_bytes, x)
    for (e, node), d in sorted(own.items()):
        name = dedicated_name(e, node)
        opts[name] = sized(pin_to_node(host_options(name, [e], spec, settings, profiles, others), node),
                           d.min_replicas, d.max_replicas, d.device_budget_bytes)
    if not planned_nodes:
        opts[HOST_DEPLOYMENT] = host_options(HOST_DEPLOYMENT, experts, spec, settings, profiles, others)
    dedicated: dict[str, dict[str, str]] = {}
    for e, node in sorted(own):
        dedicated.setdefault(e, {})[node] = dedicated_name(e, node)
    routing = {"homes": {e: nodes[0] for e, nodes in sorted(planned.items())}, "host_nodes": pool_nodes,
               "dedicated": dedicated,
               # where each expert's pools hold it (its dedicated nodes aside): a dependent call stays near its upstream
               "held_on": {e: [n for n in nodes if (e, n) not in own and n in pool_nodes]
                           for e, nodes in sorted(planned.items()) if len(nodes) > 1}}
    s = settings
    on_head = (planned_nodes or s.placement_controller) and s.front_on_head  # the controller's builds: always
    front = {"num_cpus": 0.1, **({"resources": {HEAD_RESOURCE: 0.001}} if on_head else {})}
    for name, replicas, ongoing, queued in (
            (ROUTER_DEPLOYMENT, s.router_replicas, s.max_ongoing_requests, s.max_queued_requests),
            (INGRESS_DEPLOYMENT, s.ingress_replicas, s.ingress_max_ongoing_requests, s.ingress_max_queued_requests)):
        opts[name] = {"name": name, "num_replicas": replicas, "max_ongoing_requests": ongoing,
                      "max_queued_requests": queued, "ray_actor_options": dict(front)}
    opts[ROUTER_DEPLOYMENT]["user_config"] = routing
    if s.placement_controller:
        opts[PLACEMENT_DEPLOYMENT] = {"name": PLACEMENT_DEPLOYMENT, "num_replicas": 1, "max_ongoing_requests": 8,
                                      "ray_actor_options": {"num_cpus": 0.05, "resources": {HEAD_RESOURCE: 0.001}}}
    for o in opts.values():
        o["max_surge_percent"] = s.max_surge_percent
        o["logging_config"] = {"enable_access_log": s.access_log}
    return opts


def app_profiles(spec: CoESpec, args: AppArgs, warn: Callable[[str], None] | None = None) -> dict[str, ExpertProfile]:
    """The profile entries the app is served with, and the placement controller re-plans with: the current entries
    of `args.profile` for the device each expert runs on (`serving_devices`: from the spec and `expert_num_gpus`,
    not from the machine building the app); stale ones are warned about and left out. Empty without a store."""
    if not args.profile:
        return {}
    store = ProfileStore.load(Path(args.profile))
    return usable_profiles(store, spec, Path(args.zoo), serving_devices(spec, args.settings.expert_num_gpus), warn=warn)


def app_options(spec: CoESpec, args: AppArgs, warn: Callable[[str], None] | None = None,
                others: Sequence[CoESpec] = ()) -> dict[str, dict[str, Any]]:
    """`deployment_options` with the profile entries (`app_profiles`) and the placement of `args` applied (`others`:
    the other CoEs in serving keys, `deployments.served.keyed_coes`)."""
    return deployment_options(spec, args.settings, app_profiles(spec, args, warn), args.placement, args.executors,
                              others)


def proxy_env(settings: ServeSettings) -> dict[str, str]:
    """Environment Serve's proxies read at start (not options of any API): the gRPC message size limit."""
    return {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(int(settings.grpc_max_message_mib * 2**20))}


def proxy_options(settings: ServeSettings) -> dict[str, dict[str, Any]]:
    """Serve's `http_options` and `grpc_options` (as the config file spells them; `serve.start` takes the same)."""
    s = settings
    return {"logging_config": {"enable_access_log": s.access_log},
            "http_options": {"host": s.http_host, "port": s.http_port, "request_timeout_s": s.request_timeout_s},
            "grpc_options": {"port": s.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER], "enable_reflection": True,
                             "request_timeout_s": s.request_timeout_s}}
