"""The serve flags (`expertmesh config` and `expertmesh serve`) and what they resolve to: the Serve app's
`AppArgs` (settings, profile store, plan) and the tokens file. Light (no torch, no Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from expertmesh.cli_options import add_coe_args, add_gpu_arg
from expertmesh.deployments.auth import TOKENS_ENV, write_dev_tokens
from expertmesh.deployments.config import AppArgs, ServeSettings
from expertmesh.errors import InvalidArgument
from expertmesh.home import expertmesh_home
from expertmesh.profiler.serving_profiles import default_store_path


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", help="tokens YAML of `token: factory_id` lines (default: $EXPERTMESH_TOKENS_FILE, "
                                    "else a generated dev file under $EXPERTMESH_HOME)")
    add_coe_args(p)
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--grpc-max-message-mib", type=float, default=64.0,
                   help="the largest gRPC request the proxy takes, MiB (a whole board is one request; default 64)")
    p.add_argument("--profile", help="profile store to take each expert's batch size on its host from "
                                     "(default: <zoo>/profile.json when it exists)")
    p.add_argument("--no-profile", action="store_true", help="use the spec's batch sizes")
    p.add_argument("--plan", help="plan JSON (expertmesh plan --json): pin each expert's replicas to its planned nodes")
    p.add_argument("--device-idle-s", type=float, help="an expert idle this long on its host moves its weights off the "
                                                       "device to host memory (default: never)")
    add_gpu_arg(p)
    p.add_argument("--host-idle-s", type=float, help="an expert idle this long on its host drops its weights to disk "
                                                     "(default: never); the next request loads them back")


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The serve flags as ServeSettings; a bad value names its flag."""
    try:
        return ServeSettings(http_host=args.http_host, http_port=args.http_port, grpc_port=args.grpc_port,
                             grpc_max_message_mib=getattr(args, "grpc_max_message_mib", 64.0),
                             expert_device_idle_s=args.device_idle_s, expert_host_idle_s=args.host_idle_s,
                             expert_num_gpus=args.expert_num_gpus,
                             placement_controller=getattr(args, "placement_controller", False),
                             coe_request_shares=dict(getattr(args, "coe_share", None) or []))
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        flags = {"expert_device_idle_s": "--device-idle-s", "expert_host_idle_s": "--host-idle-s",
                 "coe_request_shares": "--coe-share"}
        option = flags.get(name, "--" + name.replace("_", "-")) if name else "serve options"
        message, _, fix = err["msg"].removeprefix("Value error, ").partition("; fix: ")
        raise InvalidArgument(message, field=option, fix=fix or "see `expertmesh serve --help` for the allowed values") from None


def profile_path(args: argparse.Namespace, zoo_root: Path) -> Path | None:
    """The profile store serving reads: --profile (which must exist), else <zoo>/profile.json when it exists."""
    if args.no_profile:
        return None
    profile = Path(args.profile) if args.profile else default_store_path(zoo_root)
    if args.profile and not profile.is_file():
        raise InvalidArgument(f"no profile at {profile}", field="--profile", fix="run `expertmesh profile` first")
    if not profile.is_file():
        return None
    print(f"profile: {profile} (current entries set each expert's batch size)", file=sys.stderr)
    return profile


def read_plan(plan_file: str | None) -> tuple[dict[str, list[str]] | None, dict[str, dict] | None]:
    """The placement (expert -> nodes) and the executor sizing (node -> replicas and device budget; None in plans
    written before it) of a plan JSON written by `expertmesh plan --json`; (None, None) without a file."""
    if not plan_file:
        return None, None
    try:
        doc = json.loads(Path(plan_file).read_text())
        placement, executors = doc["replicas"], doc.get("executors") or None
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise InvalidArgument(f"{plan_file} is not a plan ({type(exc).__name__})", field="--plan",
                              fix="write one with `expertmesh plan --json FILE`") from None
    return placement, executors


def app_args(args: argparse.Namespace, zoo_root: Path, tokens_file: str) -> AppArgs:
    """The Serve application's arguments from the serve flags; a plan whose placement or executors AppArgs refuses
    gets the --plan error naming the entry."""
    settings = serve_settings(args)
    profile = profile_path(args, zoo_root)
    placement, executors = read_plan(args.plan)
    try:
        return AppArgs(spec=str(Path(args.spec).resolve()) if args.spec else None, zoo=str(zoo_root),
                       tokens_file=str(Path(tokens_file).resolve()),
                       profile=str(profile.resolve()) if profile else None,
                       placement=placement, executors=executors, settings=settings,
                       coes=[str(Path(c).resolve()) for c in getattr(args, "coe", None) or []])
    except ValidationError as exc:  # settings were checked by serve_settings; the rest comes from the plan
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidArgument(f"{args.plan}: {where}: {err['msg']}", field="--plan",
                              fix="write the plan again with `expertmesh plan --json FILE`") from None


def dev_tokens_path() -> Path:
    return expertmesh_home() / "dev-tokens.yaml"


def tokens_file(args: argparse.Namespace) -> str:
    """--tokens, else $EXPERTMESH_TOKENS_FILE, else the dev tokens file (generated on first use)."""
    chosen = args.tokens or os.environ.get(TOKENS_ENV)
    if chosen:
        return chosen
    path = dev_tokens_path()
    if not path.is_file():
        write_dev_tokens(path, ["factory-a", "factory-b"])
        print(f"generated dev tokens for factory-a and factory-b: {path}", file=sys.stderr)
    else:
        print(f"using dev tokens: {path}", file=sys.stderr)
    return str(path)
