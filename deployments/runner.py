"""`expertmesh serve`: start (or join) Ray on loopback, start Serve's HTTP and gRPC proxies, deploy the app.

Glue only. Shutdown is clean on Ctrl-C and SIGTERM: Serve first, then Ray (only a Ray this process
started). Ray is kept on 127.0.0.1 unless joining a cluster with --address.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import threading
import time

import ray
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.schema import ApplicationStatus

from expertmesh.cluster import rollout_store
from expertmesh.cluster.connect import is_loopback, keep_ray_on_loopback
from expertmesh.deployments.app import build_app
from expertmesh.deployments.config import APP_NAME, AppArgs, deployment_options, proxy_env, proxy_options
from expertmesh.deployments.served import keyed_coes
from expertmesh.errors import FailedPrecondition, Unavailable
from expertmesh.experts.spec import load_spec


def initial_cpus(args: AppArgs) -> float:
    """Logical CPUs the app's initial replicas ask for (Serve waits forever for replicas it cannot place)."""
    total = 0.0
    for opts in deployment_options(load_spec(args.spec), args.settings, placement=args.placement,
                                   executors=args.executors, others=keyed_coes(args)).values():
        replicas = opts.get("num_replicas") or opts["autoscaling_config"]["initial_replicas"]
        total += replicas * opts["ray_actor_options"]["num_cpus"]
    return total


def start(args: AppArgs, address: str | None = None, metrics_port: int = 8080) -> None:
    """Start Ray (or join `address`) and Serve, and deploy the application. Returns once it is running.

    A Ray started here serves every metric (Ray's, Serve's, ExpertMesh's) on 127.0.0.1:`metrics_port`;
    a joined cluster keeps the ports its nodes were started with (`ray start --metrics-export-port`).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address or is_loopback(address):
        keep_ray_on_loopback()
    os.environ.update(proxy_env(args.settings))  # a Ray started here passes it to the proxies; a joined cluster's own
    needed = initial_cpus(args)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a dev box: logical CPUs are a scheduling budget, so give the local node enough for every replica
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 num_cpus=max(os.cpu_count() or 1, math.ceil(needed + 1)), _metrics_export_port=metrics_port,
                 _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    have = ray.cluster_resources().get("CPU", 0.0)
    if have + 1e-9 < needed + 0.1:  # + Serve's own controller and proxies
        ray.shutdown()
        raise FailedPrecondition(f"the app's initial replicas need {needed:.2f} logical CPUs, the cluster has {have:.2f}",
                                 field="host_num_cpus", fix="add nodes, or lower host_num_cpus / host_replicas")
    proxies = proxy_options(args.settings)
    # every node of a loopback cluster shares 127.0.0.1: only one proxy can hold the ports, so run it on the head
    serve.start(proxy_location="HeadOnly" if not address or is_loopback(address) else "EveryNode",
                http_options=proxies["http_options"], grpc_options=gRPCOptions(**proxies["grpc_options"]),
                logging_config=proxies["logging_config"])
    rollout_store.clear()  # a fresh deploy serves the spec it is given, whatever a rollout served before
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    rollout_store.write_app_args(args.model_dump(mode="json"))  # what `expertmesh rollout` rebuilds the app from


def ray_address() -> str:
    """The address of the Ray cluster this process is connected to (what `--address` takes)."""
    return ray.get_runtime_context().gcs_address


def redeploy(args: AppArgs, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
    """Apply new app arguments (a new placement) to the running application; returns once it is running again.

    Submits without blocking, then waits for RUNNING itself: during a node loss a replica that dies mid-update
    makes Serve report DEPLOY_FAILED for a moment while it replaces it, which `serve.run` would take as final."""
    serve._run(build_app(args), name=APP_NAME, route_prefix="/", _blocking=False)  # serve.run minus the strict wait
    rollout_store.write_app_args(args.model_dump(mode="json"))  # a re-plan's placement is what a rollout keeps
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        time.sleep(poll_s)
    raise Unavailable(f"the application did not run again within {timeout_s:g} s after a redeploy "
                      f"(status {status.status.value if status else 'missing'}: {status.message if status else ''})",
                      fix="check `serve status` and the replicas' logs")


def stop() -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def wait_for_signal(timeout_s: float | None = None) -> str:
    """Block until SIGINT/SIGTERM (or the timeout); returns what ended the wait."""
    done = threading.Event()
    why = {"reason": "timeout"}

    def handler(signum, _frame):
        why["reason"] = signal.Signals(signum).name
        done.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        done.wait(timeout_s)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    return why["reason"]


def endpoints(args: AppArgs) -> list[str]:
    s = args.settings
    host = s.http_host if s.http_host not in ("0.0.0.0", "::") else "127.0.0.1"
    return [f"gRPC  {host}:{s.grpc_port}  expertmesh.v1.InspectionService/Inspect, /InspectBoard (reflection on)",
            f"gRPC  {host}:{s.grpc_port}  ray.serve.RayServeAPIService/Healthz (health check)",
            f"HTTP  http://{host}:{s.http_port}/v1/inspect  (POST JSON, base64 image)",
            f"HTTP  http://{host}:{s.http_port}/-/healthz  (health check)"]

