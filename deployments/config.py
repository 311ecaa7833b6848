"""Serve settings and the Serve config built from a spec: data checked against Ray Serve's schema, no cluster.

`deployment_options` is the one source of every deployment's options (autoscaling, batching,
fractional CPU/GPU, queue limits), and `proxy_options` of the HTTP and gRPC proxies': the app builder
and `expertmesh serve` apply them in code, and `build_serve_config` writes them into the config file
that `serve deploy` and KubeRay (the Helm chart's RayService, as its serveConfigV2) run, so the two
can never disagree. `app_profiles` is the one choice of profile entries: those of the device each
expert runs on, for serving and for the placement controller alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray.serve.schema import ServeDeploySchema

from expertmesh.cluster.labels import NODE_LABEL
from expertmesh.errors import InvalidArgument
from expertmesh.experts.spec import CoESpec, ExpertSpec
from expertmesh.profiler.serving_profiles import serving_device, serving_devices, usable_profiles
from expertmesh.profiler.store import ExpertProfile, ProfileStore

APP_NAME = "expertmesh"
ROUTER_DEPLOYMENT = "Router"
INGRESS_DEPLOYMENT = "Ingress"
GRPC_SERVICER = "expertmesh.v1.inspection_pb2_grpc.add_InspectionServiceServicer_to_server"
IMPORT_PATH = "expertmesh.deployments.app:build_app"


class ServeSettings(BaseModel):
    """How the CoE is served (ports, batching, queues, replica sizes). Every field has a production default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=1, le=65535)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1)
    expert_num_cpus: float = Field(0.25, gt=0, le=64)
    expert_num_gpus: float = Field(0.0, ge=0, le=8, description="per replica of a device: cuda/auto expert")
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(256, ge=-1, description="router and expert handles; -1: unbounded")
    expert_timeout_s: float = Field(30.0, gt=0, description="an expert call slower than this fails the request")
    request_timeout_s: float = Field(60.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    router_replicas: int = Field(1, ge=1)
    ingress_replicas: int = Field(1, ge=1)
    ingress_max_ongoing_requests: int = Field(128, ge=1, description="per ingress replica; InspectBoard counts once")
    board_max_components: int = Field(512, ge=1, description="a board with more components is refused (INVALID_ARGUMENT)")
    board_max_in_flight: int = Field(16, ge=1, description="components of one board inspected at once")
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
    ingress_max_queued_requests: int = Field(
        256, ge=-1, description="requests waiting for an ingress replica; past it stations get RESOURCE_EXHAUSTED "
                                "(HTTP 503); -1: unbounded")

    @model_validator(mode="after")
    def _ports_differ(self) -> ServeSettings:
        if self.http_port == self.grpc_port:
            raise ValueError(f"http_port and grpc_port are both {self.http_port}; give them different ports")
        if (self.expert_device_idle_s is not None and self.expert_host_idle_s is not None
                and self.expert_host_idle_s < self.expert_device_idle_s):
            raise ValueError(f"expert_host_idle_s ({self.expert_host_idle_s}) is below expert_device_idle_s "
                             f"({self.expert_device_idle_s}); fix: make expert_host_idle_s at least expert_device_idle_s")
        return self


class AppArgs(BaseModel):
    """Arguments of the Serve application builder (`args:` in the Serve config)."""

    model_config = ConfigDict(extra="forbid")

    spec: str | None = Field(None, description="CoE spec YAML; none: the embedded pcb-aoi")
    zoo: str = Field(description="zoo directory with the checkpoints")
    tokens_file: str = Field(description="YAML of `token: factory_id` lines")
    profile: str | None = Field(None, description="profile store (expertmesh profile); its current entries set "
                                                  "each expert's batch size and autoscaling target")
    placement: dict[str, list[str]] | None = Field(
        None, description="expert -> the nodes (expertmesh.io/node labels) its replicas must run on, from a plan")
    settings: ServeSettings = Field(default_factory=ServeSettings)


def _uses_gpu(expert: ExpertSpec, settings: ServeSettings) -> bool:
    return serving_device(expert, settings.expert_num_gpus) == "cuda"


def expert_options(expert: ExpertSpec, settings: ServeSettings, profile: ExpertProfile | None = None) -> dict[str, Any]:
    """One expert's options. With a current profile, the batch size is its largest useful batch and the autoscaling
    target is one such batch in flight per replica; without one, the spec's max_batch and target."""
    a = expert.autoscaling
    max_batch = profile.max_useful_batch if profile else expert.max_batch
    target = float(profile.max_useful_batch) if profile else a.target_ongoing_requests
    return {
        "name": expert.name,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "initial_replicas": max(1, a.min_replicas),
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": target,
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
        },
        "ray_actor_options": {
            "num_cpus": settings.expert_num_cpus,
            "num_gpus": settings.expert_num_gpus if _uses_gpu(expert, settings) else 0,
        },
        "user_config": {"max_batch_size": max_batch, "batch_wait_timeout_s": settings.batch_wait_timeout_s,
                        "device_idle_s": settings.expert_device_idle_s, "host_idle_s": settings.expert_host_idle_s},
    }


HEAD_RESOURCE = "node:__internal_head__"  # every Ray head node has 1 of it


def executor_name(node: str) -> str:
    return f"{ROUTER_DEPLOYMENT}-{node}"


def pin_to_nodes(options: dict[str, Any], nodes: list[str], all_nodes: list[str] | None = None) -> dict[str, Any]:
    """Pin a deployment's replicas to these nodes by their `expertmesh.io/node` label. One node is a plain selector.
    Several get at least one replica each (at most their share per node, so Serve spreads them) and a selector that
    excludes the other planned nodes (`!in(...)`), or none when they are all of them: losing one of its nodes then
    leaves the selector unchanged, so the surviving replicas keep running instead of restarting."""
    if len(nodes) == 1:
        selector: dict[str, str] | None = {NODE_LABEL: nodes[0]}
    else:
        others = sorted(set(all_nodes or nodes) - set(nodes))
        selector = {NODE_LABEL: f"!in({','.join(others)})"} if others else None
    actor = {k: v for k, v in options["ray_actor_options"].items() if k != "label_selector"}
    out = {**options, "ray_actor_options": {**actor, **({"label_selector": selector} if selector else {})}}
    if len(nodes) > 1:
        a = dict(out["autoscaling_config"])
        a["min_replicas"] = max(a["min_replicas"], len(nodes))
        a["max_replicas"] = max(a["max_replicas"], len(nodes))
        a["initial_replicas"] = max(a.get("initial_replicas") or 0, len(nodes))
        out["autoscaling_config"] = a
        out["max_replicas_per_node"] = -(-a["max_replicas"] // len(nodes))  # spread: Serve alone may double up
    return out


def deployment_options(spec: CoESpec, settings: ServeSettings, profiles: dict[str, ExpertProfile] | None = None,
                       placement: dict[str, list[str]] | None = None) -> dict[str, dict[str, Any]]:
    """Options of every deployment of the app, by deployment name (pinned to nodes where a placement says so)."""
    profiles = profiles or {}
    opts = {e.name: expert_options(e, settings, profiles.get(e.name)) for e in spec.experts}
    unknown = sorted(set(placement or {}) - set(opts))
    if unknown:
        raise InvalidArgument(f"the placement names experts the spec does not have: {', '.join(unknown)}",
                              field="placement", fix="plan with the same spec")
    planned_nodes = sorted({n for nodes in (placement or {}).values() for n in nodes})
    for name, nodes in (placement or {}).items():
        if nodes:
            opts[name] = pin_to_nodes(opts[name], sorted(nodes), planned_nodes)
    # the routers learn the placement through user_config (reconfigured in place, never restarted by a re-plan)
    routing = {"homes": {e: nodes[0] for e, nodes in sorted((placement or {}).items()) if nodes},
               "executor_nodes": planned_nodes}
    for node in planned_nodes:
        name = executor_name(node)  # one plan executor per planned node, pinned there
        opts[name] = pin_to_nodes({"name": name, "num_replicas": 1, "max_ongoing_requests": 4 * settings.max_ongoing_requests,
                                   "max_queued_requests": settings.max_queued_requests,
                                   "ray_actor_options": {"num_cpus": 0.1},
                                   "user_config": {**routing, "executor_nodes": []}}, [node])  # it hands nothing off
    s = settings
    front = {"num_cpus": 0.1, **({"resources": {HEAD_RESOURCE: 0.001}} if placement and s.front_on_head else {})}
    for name, replicas, ongoing, queued in (
            (ROUTER_DEPLOYMENT, s.router_replicas, 4 * s.max_ongoing_requests, s.max_queued_requests),
            (INGRESS_DEPLOYMENT, s.ingress_replicas, s.ingress_max_ongoing_requests, s.ingress_max_queued_requests)):
        opts[name] = {"name": name, "num_replicas": replicas, "max_ongoing_requests": ongoing,
                      "max_queued_requests": queued, "ray_actor_options": dict(front)}
    opts[ROUTER_DEPLOYMENT]["user_config"] = routing
    for o in opts.values():  # a surge replica of a deployment capped per node may have no node to go to
        o["max_surge_percent"] = 0 if "max_replicas_per_node" in o else s.max_surge_percent
    return opts


def app_profiles(spec: CoESpec, args: AppArgs, warn: Callable[[str], None] | None = None) -> dict[str, ExpertProfile]:
    """The profile entries the app is served with, and the placement controller re-plans with: the current entries
    of `args.profile` for the device each expert runs on (`serving_devices`: from the spec and `expert_num_gpus`,
    not from the machine building the app); stale ones are warned about and left out. Empty without a store."""
    if not args.profile:
        return {}
    store = ProfileStore.load(Path(args.profile))
    return usable_profiles(store, spec, Path(args.zoo), serving_devices(spec, args.settings.expert_num_gpus), warn=warn)


def app_options(spec: CoESpec, args: AppArgs, warn: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """`deployment_options` with the profile entries (`app_profiles`) and the placement of `args` applied."""
    return deployment_options(spec, args.settings, app_profiles(spec, args, warn), args.placement)


def proxy_options(settings: ServeSettings) -> dict[str, dict[str, Any]]:
    """Serve's `http_options` and `grpc_options` (as the config file spells them; `serve.start` takes the same)."""
    s = settings
    return {"http_options": {"host": s.http_host, "port": s.http_port, "request_timeout_s": s.request_timeout_s},
            "grpc_options": {"port": s.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER], "enable_reflection": True,
                             "request_timeout_s": s.request_timeout_s}}


def build_serve_config(spec: CoESpec, args: AppArgs, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A Serve config file (the schema `serve deploy` accepts) for the spec's application, checked against Ray
    Serve's own `ServeDeploySchema`: what it would refuse is refused here, naming the field."""
    config = {
        "proxy_location": "EveryNode",
        **proxy_options(args.settings),
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": args.model_dump(mode="json"),
            "deployments": list(app_options(spec, args, warn).values()),
        }],
    }
    check_serve_config(config)
    return config


def check_serve_config(config: dict[str, Any]) -> None:
    """Refuse a config `serve deploy` would refuse: InvalidArgument naming the first bad field (deployments by name)."""
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc, path = list(first["loc"]), []
        for i, part in enumerate(loc):
            if isinstance(part, int) and i > 0 and loc[i - 1] == "deployments":
                name = config["applications"][loc[1]]["deployments"][part].get("name", part)
                path[-1] += f"[{name}]"
            elif isinstance(part, int):
                path[-1] += f"[{part}]"
            else:
                path.append(str(part))
        raise InvalidArgument(f"Ray Serve would refuse this config: {first['msg']} (got {first.get('input')!r})",
                              field=".".join(path), fix="fix the serve setting or spec field behind it") from None


def resolve_paths(args: AppArgs, base: Path) -> AppArgs:
    """Make relative paths in `args` absolute against `base` (Serve may run in another working directory)."""
    def absolute(p: str | None) -> str | None:
        return None if p is None else str((base / p).resolve()) if not Path(p).is_absolute() else p
    return args.model_copy(update={"spec": absolute(args.spec), "zoo": absolute(args.zoo),
                                   "tokens_file": absolute(args.tokens_file), "profile": absolute(args.profile)})
