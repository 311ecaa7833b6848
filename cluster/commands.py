"""The cluster commands of the CLI: `expertmesh up`, `down`, `node remove`, `status` and `plan` (glue over cluster/).

Light to import (Ray is imported only when a command reaches a cluster), so `expertmesh --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from expertmesh.cli_options import (add_coe_args, add_gpu_arg, add_json_arg, add_spec_args, emit_json, positive,
                                    spec_and_zoo)
from expertmesh.cluster.dedicate import DEFAULT_MIN_BUSY
from expertmesh.cluster.demand import executor_sizing, joint_problem
from expertmesh.cluster.explain import format_plan, plan_json
from expertmesh.cluster.local import (LocalClusterConfig, describe, down, format_status, inventory, read_state,
                                      remove_node, up)
from expertmesh.cluster.placement import NodeCapacity, plan
from expertmesh.cluster.served import served_demand
from expertmesh.errors import InvalidArgument
from expertmesh.profiler.serving_profiles import default_store_path
from expertmesh.profiler.store import ProfileStore


def cmd_plan(args) -> int:
    spec, zoo_root = spec_and_zoo(args)
    store = ProfileStore.load(Path(args.profile) if args.profile else default_store_path(zoo_root))
    warn = lambda m: print(f"warning: {m}", file=sys.stderr)  # noqa: E731
    # the entries of the device each expert will be served on (the same choice `expertmesh serve` makes); the other
    # CoEs' experts keyed as the app serves them, those without a current entry estimated from the profiled ones
    demand = served_demand(args.spec, zoo_root, [str(Path(c).resolve()) for c in args.coe], store,
                           args.expert_num_gpus, dict(args.coe_share), warn=warn,
                           shares_field="--coe-share", require_profiles=True)
    address = args.address or (None if args.nodes else (read_state() or {}).get("address"))
    if address:
        nodes = inventory(describe(address))
        print(f"nodes from the live cluster {address}: {', '.join(n.name for n in nodes)}", file=sys.stderr)
    else:
        nodes = [NodeCapacity(name=f"node-{i}", memory_bytes=int(args.node_memory_gb * 2**30), cpus=args.cpus_per_node)
                 for i in range(args.nodes or 3)]
    usage = demand.usage
    problem = joint_problem(demand.coes, demand.costs, nodes, args.rps, usage=usage)
    result = plan(problem, args.method)
    executors = executor_sizing(demand.coes, demand.costs, usage, nodes, args.rps, result,
                                dedicate_min_busy=args.dedicate_min_busy,
                                components_per_request=args.components_per_request)
    names = " + ".join(c.spec.name for c in demand.coes)
    estimated = sorted(set(demand.keys) - demand.profiled)
    if estimated:
        print(f"estimated from their checkpoints (no current profile): {', '.join(estimated)}", file=sys.stderr)
    print(format_plan(result, problem, explain=args.explain, executors=executors,
                      title=f"{names} on {len(nodes)} nodes at {args.rps:g} requests/s: "))
    emit_json(args, plan_json(result, executors))
    return 0


def cmd_up(args) -> int:
    try:
        cfg = LocalClusterConfig(num_nodes=args.nodes, gpus_per_node=args.gpus_per_node, node_memory_gb=args.node_memory_gb,
                                 cpus_per_node=args.cpus_per_node, pool=args.pool,
                                 metrics_base_port=args.metrics_base_port, dashboard_port=args.dashboard_port)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0])
        raise InvalidArgument(f"{err['msg']} (got {err.get('input')!r})", field="--nodes" if name == "num_nodes"
                              else "--" + name.replace("_", "-"), fix="see `expertmesh up --help`") from None
    print(f"starting {cfg.num_nodes} Ray nodes on 127.0.0.1 ...", flush=True)
    t0 = time.perf_counter()
    state = up(cfg)
    print(f"up in {time.perf_counter() - t0:.1f} s: address {state['address']}, dashboard {state['dashboard']}")
    for n in state["nodes"]:
        print(f"  {n['name']}: {cfg.gpus_per_node} GPU(s), {cfg.node_memory_gb:g} GiB, metrics {n['metrics']}")
    print(f"serve on it: expertmesh serve --address {state['address']}; stop it: expertmesh down")
    return 0


def cmd_down(args) -> int:
    print("local cluster stopped" if down() else "no local cluster is up")
    return 0


def cmd_node_remove(args) -> int:
    remove_node(args.name)
    print(f"removed {args.name}")
    return 0


def cmd_status(args) -> int:
    address = args.address or (read_state() or {}).get("address")
    if not address:
        raise InvalidArgument("no local cluster is up and no --address given", field="--address",
                              fix="run `expertmesh up` or pass --address HOST:PORT")
    desc = describe(address)
    if args.json:
        emit_json(args, json.dumps({"address": address, **desc}, indent=1))
    else:
        print(format_status(desc, address))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the cluster subcommands to the CLI's subparsers."""
    upp = sub.add_parser("up", help="start a multi-node Ray cluster on this machine (loopback only)")
    upp.add_argument("--nodes", type=int, default=3, help="nodes, the head included")
    upp.add_argument("--gpus-per-node", type=int, default=0, help="logical GPUs each node declares")
    upp.add_argument("--node-memory-gb", type=float, default=16.0, help="device memory each node offers, GiB")
    upp.add_argument("--cpus-per-node", type=float, default=4.0, help="logical CPUs each node declares")
    upp.add_argument("--pool", default="default", help="pool label of the nodes (a factory or GPU type)")
    upp.add_argument("--metrics-base-port", type=int, default=8080, help="node i serves its metrics on this + i")
    upp.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard (state API) on the head")
    upp.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the local cluster").set_defaults(func=cmd_down)
    node = sub.add_parser("node", help="local cluster nodes").add_subparsers(dest="node_command", required=True)
    rm = node.add_parser("remove", help="take a worker node of the local cluster down (to test node loss)")
    rm.add_argument("name", help="node name, e.g. node-2")
    rm.set_defaults(func=cmd_node_remove)
    st = sub.add_parser("status", help="nodes, their capacity, and which replicas run where")
    st.add_argument("--address", help="Ray address (default: the local cluster's)")
    add_json_arg(st, "the nodes and replicas")
    st.set_defaults(func=cmd_status)

    pl = sub.add_parser("plan", help="plan where each expert runs so dependent experts share a node")
    add_spec_args(pl)
    add_coe_args(pl)  # plan several CoEs together, as `expertmesh serve --coe` serves them
    pl.add_argument("--profile", help="profile store (default: <zoo>/profile.json)")
    pl.add_argument("--address", help="plan for this live cluster's nodes (default: the local cluster when one is up, "
                                      "unless --nodes is given)")
    pl.add_argument("--nodes", type=int, help="plan for this many identical nodes instead (default 3)")
    pl.add_argument("--node-memory-gb", type=positive(float), default=16.0, help="device memory per node, GiB")
    pl.add_argument("--cpus-per-node", type=positive(float), default=4.0,
                    help="logical CPUs per node, with --nodes (expert-host sizing: how many replicas fit and run at once)")
    pl.add_argument("--rps", type=positive(float), default=20.0, help="requests per second to plan for")
    pl.add_argument("--method", choices=["auto", "exact", "heuristic"], default="auto")
    add_gpu_arg(pl)  # plan with the profile entries of the device the experts will be served on
    pl.add_argument("--dedicate-min-busy", type=positive(float), default=DEFAULT_MIN_BUSY, metavar="B",
                    help="an expert whose planned calls keep at least B replicas busy gets its own autoscaled "
                         "deployment instead of a place in its node's pool (default %(default)s)")
    pl.add_argument("--components-per-request", type=positive(int), default=1, metavar="N",
                    help="components a request carries (a board: many); the memory model simulates requests of that "
                         "shape when it sizes each node's pooled hosts (default %(default)s)")
    pl.add_argument("--explain", action="store_true", help="say why each expert sits where it does")
    add_json_arg(pl, "the plan")
    pl.set_defaults(func=cmd_plan)
