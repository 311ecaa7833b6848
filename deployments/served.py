"""What an app serves, in deployment options and in a Serve config file: its CoEs and their revisions.

An app serves its spec (`--spec`, the base) and the other CoEs (`--coe`): `served_coes` loads and checks them
(names, the tokens file's `coes:`, the request shares), `keyed_coes` keys them against the base the way the router and
the hosts do (`experts.revisions`), so the placement, the hosts' expert lists and the router's homes all name the
same serving keys. `served_options` is `config.app_options` over every CoE with the revisions served
(`with_rollout`: a live change's and the other CoEs'), what the app builder deploys and `build_serve_config` writes
into the config file `serve deploy` and KubeRay run, checked against Ray Serve's own schema.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from expertmesh.cluster.rollout import RolloutState
from expertmesh.cluster.served import check_shares
from expertmesh.deployments import config as deployment_config
from expertmesh.deployments.auth import TokenTable
from expertmesh.deployments.config import (APP_NAME, HOST_DEPLOYMENT, DEDICATED_DEPLOYMENT, IMPORT_PATH,
                                           INGRESS_DEPLOYMENT, PLACEMENT_DEPLOYMENT, ROUTER_DEPLOYMENT, AppArgs,
                                           ServeSettings, proxy_options)
from expertmesh.errors import InvalidArgument
from expertmesh.experts.revisions import RevisionSet
from expertmesh.experts.spec import CoESpec, load_spec


def with_rollout(opts: dict[str, dict[str, Any]], state: RolloutState, input_sizes_px: list[int],
                 coes: dict[str, str] | None = None,
                 coe_rollouts: dict[str, RolloutState] | None = None) -> dict[str, dict[str, Any]]:
    """The options with the revisions served in user_config: the hosts get every one they must serve (a live
    change's `known`, `cluster.rollout`, the other CoEs' specs and their live changes' `known`), the ingress their
    input sizes and the other CoEs' names, the router which revision each request takes (`coes`: the other CoEs,
    spec name -> spec file; `coe_rollouts`: their live changes, where a stable revision "" is the CoE's file)."""
    coes = dict(coes or {})
    others = {name: s for name, s in (coe_rollouts or {}).items() if name in coes}
    revisions = list(dict.fromkeys([*state.known, *coes.values(), *(p for s in others.values() for p in s.known)]))
    out = {}
    for name, o in opts.items():
        if name == ROUTER_DEPLOYMENT:
            o = {**o, "user_config": {**o.get("user_config", {}), "rollout": state.router_config(), "coes": coes,
                                      "coe_rollouts": {n: s.router_config() for n, s in sorted(others.items())}}}
        elif name == INGRESS_DEPLOYMENT:
            o = {**o, "user_config": {"input_sizes_px": list(input_sizes_px), "coes": list(coes)}}
        elif name == HOST_DEPLOYMENT or name.startswith((HOST_DEPLOYMENT + "-", DEDICATED_DEPLOYMENT + "-")):
            o = {**o, "user_config": {**o["user_config"], "revisions": revisions}}
        out[name] = o
    return out


def served_coes(spec: CoESpec, a: AppArgs) -> dict[str, CoESpec]:
    """The other CoEs the app serves (`--coe`), by spec name, each checked (checkpoints in the zoo), and the tokens
    file's `coes:` and the request shares checked against them: a name served twice, or a tenancy entry or share
    naming a CoE not served, is refused."""
    out: dict[str, CoESpec] = {}
    for path in a.coes:
        other = load_spec(path, zoo_root=Path(a.zoo))
        if other.name == spec.name or other.name in out:
            raise InvalidArgument(f"two served CoEs are named {other.name!r} ({path})", field="coes",
                                  fix="give each spec its own `name` (a request names its CoE by it)")
        out[other.name] = other.with_base_dir(Path(path).parent)
    check_shares(a.settings.coe_request_shares, [spec.name, *out], "coe_request_shares")
    if not Path(a.tokens_file).is_file():  # `expertmesh config` for a cluster's file: the app build checks it there
        return out
    unknown = TokenTable.load(a.tokens_file).coes.unknown_names([spec.name, *out])
    if unknown:
        raise InvalidArgument(f"the tokens file's `coes:` names CoEs not served here: {', '.join(unknown)}",
                              field="coes", fix=f"serve them with --coe SPEC, or name one of: "
                                                f"{', '.join([spec.name, *out])}")
    return out


def input_sizes(state: RolloutState, coes: dict[str, CoESpec], zoo: str,
                coe_rollouts: dict[str, RolloutState] | None = None) -> list[int]:
    """Every input size the revisions the rollouts serve and the other CoEs need (their specs and checkpoints
    checked)."""
    known = {*state.known, *(p for s in (coe_rollouts or {}).values() for p in s.known)}
    rollout = {size for path in known for size in load_spec(path, zoo_root=Path(zoo)).input_sizes_px}
    return sorted(rollout | {size for c in coes.values() for size in c.input_sizes_px})


def keyed_coes(a: AppArgs) -> list[CoESpec]:
    """The other CoEs' specs in serving keys, against the app's spec (what the hosts and the router serve them as)."""
    if not a.coes:
        return []
    revisions = RevisionSet(a.spec, a.zoo)
    return [revisions.get(path).spec for path in a.coes]



def served_placement(placement: dict[str, list[str]], spec: CoESpec,
                     others: list[CoESpec]) -> tuple[dict[str, list[str]], list[str]]:
    """(the entries of a stored placement this app serves, the keys left out): a placement the in-cluster controller
    stored for an earlier config (a CoE since removed, an expert since retrained into a new version) must not stop
    the app from building; the controller places what is missing at its next poll (an `experts_changed` re-plan)."""
    served = {e.name for x in (spec, *others) for e in x.experts}
    return {e: ns for e, ns in placement.items() if e in served}, sorted(set(placement) - served)


def served_options(spec: CoESpec, args: AppArgs, warn: Callable[[str], None] | None = None,
                   rollout: RolloutState | None = None, coes: dict[str, CoESpec] | None = None,
                   coe_rollouts: dict[str, RolloutState] | None = None,
                   keyed: list[CoESpec] | None = None) -> dict[str, dict[str, Any]]:
    """`deployment_config.app_options` over every served CoE with the revisions served (`with_rollout`): the live
    changes' (`rollout`: the app's own CoE's, `coe_rollouts`: the other CoEs' by name) and the other CoEs'. `coes`
    and `keyed`: `served_coes(spec, args)` and `keyed_coes(args)` when the caller has them already."""
    coes = served_coes(spec, args) if coes is None else coes
    keyed = keyed_coes(args) if keyed is None else keyed
    state = rollout or RolloutState()
    return with_rollout(deployment_config.app_options(spec, args, warn, keyed), state,
                        input_sizes(state, coes, args.zoo, coe_rollouts), {name: path for name, path in zip(coes, args.coes)},
                        coe_rollouts)


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
            "deployments": config_deployments(served_options(spec, args, warn), args.settings),
        }],
    }
    check_serve_config(config)
    return config


def config_deployments(opts: dict[str, dict[str, Any]], settings: ServeSettings) -> list[dict[str, Any]]:
    """The deployment options a config file lists. With the in-cluster controller, only what no placement changes:
    Serve applies a re-submitted config's options over the built app, so a `Host` entry would name a deployment the
    placement replaced (Serve refuses the config) and the router's user_config would reset its routing; the hosts'
    options come from the settings in `args` instead."""
    if not settings.placement_controller:
        return list(opts.values())
    out = [o for name, o in opts.items() if name in (ROUTER_DEPLOYMENT, INGRESS_DEPLOYMENT, PLACEMENT_DEPLOYMENT)]
    return [{k: v for k, v in o.items() if not (o["name"] == ROUTER_DEPLOYMENT and k == "user_config")} for o in out]


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
