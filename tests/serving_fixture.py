"""Test support shared by the integration tests: one Ray + Serve instance for the session (starting it costs ~20-40
s), the CLI as a user runs it (`cli`), and the teardown of a `serve` process and its local cluster (`stop_serve`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.cluster.ports import free_port  # noqa: F401 - the tests import it from here

GRPC_MAX_MESSAGE_MIB = 8.0  # the shared instance's gRPC message limit


def cli(env: dict | None, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`expertmesh ARGS` as a separate process, as a user runs it (env: its environment; None: this one's)."""
    return subprocess.run([sys.executable, "-m", "expertmesh.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def stop_serve(serve: subprocess.Popen | None, env: dict) -> None:
    """End a `serve` process as a signal would (SIGTERM, then kill after 60 s) and take its local cluster down."""
    if serve is not None:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
    cli(env, "down")


@dataclass
class Serving:
    grpc_target: str
    http_url: str
    tokens: dict[str, str]  # factory -> token
    spec_path: Path
    zoo: Path
    metrics_port: int
    ray_temp_dir: Path  # Ray's session files: logs/serve/ holds every replica's log
    app_args: object = None  # the AppArgs deployed (what a rollout or a redeploy rebuilds the app from)

    @property
    def tokens_file(self) -> Path:
        return self.spec_path.parent / "tokens.yaml"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def start_serving(spec_data: dict, zoo: Path, workdir: Path) -> Serving:
    from expertmesh.deployments.runner import keep_ray_on_loopback

    keep_ray_on_loopback()
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from expertmesh.cluster import rollout_store
    from expertmesh.deployments.app import build_app
    from expertmesh.deployments.auth import write_dev_tokens
    from expertmesh.deployments.config import APP_NAME, GRPC_SERVICER, AppArgs, ServeSettings, proxy_env

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_data))
    tokens = write_dev_tokens(workdir / "tokens.yaml", ["factory-a", "factory-b"])
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    ray_temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # a small ingress queue, so a flood meets backpressure (RESOURCE_EXHAUSTED) quickly; short residency
    # timeouts, so idle experts really leave memory and the next request waits for a load; a device budget below what
    # the experts take, so the memory-limited path (evictions, switches, prefetches) runs under every integration test;
    # an 8 MiB gRPC message limit, so the test of it sends 9 MiB, not 65
    settings = ServeSettings(http_port=http_port, grpc_port=grpc_port, host_num_cpus=0.5, upscale_delay_s=1,
                             downscale_delay_s=5, expert_timeout_s=20, ingress_max_ongoing_requests=4,
                             ingress_max_queued_requests=8, expert_device_idle_s=1.5, expert_host_idle_s=3.0,
                             pool_device_budget_mib=2.0,  # ~6 of the 10 experts: the pool evicts and switches
                             grpc_max_message_mib=GRPC_MAX_MESSAGE_MIB)
    os.environ.update(proxy_env(settings))  # what `expertmesh serve` does before it starts Ray
    # metrics reported every second (Ray's default is 10 s) so the Prometheus test sees traffic quickly
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000},
             _temp_dir=ray_temp_dir, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]))
    args = AppArgs(spec=str(spec_path), zoo=str(zoo), tokens_file=str(workdir / "tokens.yaml"), settings=settings)
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    rollout_store.write_app_args(args.model_dump(mode="json"))  # as `expertmesh serve` does
    return Serving(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", tokens, spec_path, zoo, metrics_port,
                   Path(ray_temp_dir), args)


def stop_serving() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def metric_total(url: str, name: str, **labels: str) -> float:
    """The sum of every sample of the exported metric `name` (a counter's `_total` or a histogram's `_count`, say)
    on one /metrics page whose labels include `labels`; 0.0 when there is none."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(s.value) for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
