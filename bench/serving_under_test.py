"""What the throughput benchmark measures against: one loopback Ray node, the no-op app, and ExpertMesh on it.

The bench starts its own single-node Ray (`ray start --head --block`, the options `expertmesh serve` gives the
Ray it starts), so the no-op app and ExpertMesh share it: the driver joins it for the no-op app (Serve's proxy with
ExpertMesh's own `proxy_options`), deletes that app and leaves, then `runner.start(args, address=...)` deploys
ExpertMesh there exactly as `expertmesh serve --address` would. Only the wire contract, `runner.start/stop`,
`AppArgs/ServeSettings/proxy_options` and `auth.write_dev_tokens` of the serving code are used.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import ray
from ray import serve
from ray.serve.config import gRPCOptions

from expertmesh.bench.noop_app import NOOP_APP_NAME, noop_app
from expertmesh.cluster.connect import keep_ray_on_loopback
from expertmesh.cluster.ports import free_port
from expertmesh.deployments import runner
from expertmesh.deployments.auth import write_dev_tokens
from expertmesh.deployments.config import AppArgs, ServeSettings, proxy_options
from expertmesh.experts.spec import CoESpec, resolve_checkpoint
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc

FACTORY_ID = "bench"
REPLICA_PREFIX = "ServeReplica:expertmesh:"  # Serve names a replica's actor class ServeReplica:<app>:<deployment>
RAY_START_TIMEOUT_S = 120.0


@dataclass
class RayNode:
    """A loopback Ray head this process started (`ray start --head --block`, in a session of its own)."""

    address: str
    process: subprocess.Popen
    temp_dir: Path
    start_s: float  # from `ray start` to the runtime up

    @classmethod
    def start(cls, num_cpus: int) -> RayNode:
        keep_ray_on_loopback()  # the environment reaches `ray start` and every process it starts
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        port = free_port()
        log = temp_dir / "ray-start.log"
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=false",
               f"--metrics-export-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        t0 = time.perf_counter()
        with open(log, "w") as out:
            # `ray start` turns token authentication on when it finds a token (~/.ray/auth_token); a Ray that
            # `ray.init` starts, as `expertmesh serve` does, never does: keep it off so drivers join without one
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.perf_counter() - t0 > RAY_START_TIMEOUT_S:
                proc.kill()
                raise RuntimeError(f"`ray start` did not start a node (see {log}):\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        return cls(f"127.0.0.1:{port}", proc, temp_dir, time.perf_counter() - t0)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to `ray start --block` (it stops every process of its node); SIGKILL to its session if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def node_num_cpus(args: AppArgs) -> int:
    """Logical CPUs of the node: what `expertmesh serve` gives the Ray it starts (the machine's CPUs, or enough for
    the app's initial replicas when that is more; `runner.initial_cpus` where the runner has it)."""
    initial_cpus = getattr(runner, "initial_cpus", None)
    needed = initial_cpus(args) if initial_cpus is not None else 0.0
    return max(os.cpu_count() or 1, math.ceil(needed + 1))


def serve_settings() -> ServeSettings:
    http_port = free_port()
    grpc_port = free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    return ServeSettings(http_port=http_port, grpc_port=grpc_port)


def grpc_target(settings: ServeSettings) -> str:
    return f"127.0.0.1:{settings.grpc_port}"


def bench_tokens(workdir: Path) -> tuple[Path, str]:
    """A fresh tokens file with one factory (`bench`); returns (its path, the token)."""
    path = workdir / "tokens.yaml"
    return path, write_dev_tokens(path, [FACTORY_ID])[FACTORY_ID]


def deploy_noop(address: str, settings: ServeSettings) -> float:
    """Join the node, start Serve with ExpertMesh's proxy options, run the no-op app; returns seconds to running."""
    t0 = time.perf_counter()
    ray.init(address=address, log_to_driver=False)
    proxies = proxy_options(settings)
    # the proxy as ExpertMesh starts it (access log off unless settings.access_log), and the no-op replica the same
    serve.start(proxy_location="HeadOnly", http_options=proxies["http_options"],
                grpc_options=gRPCOptions(**proxies["grpc_options"]), logging_config=proxies["logging_config"])
    serve.run(noop_app(logging_config=proxies["logging_config"]), name=NOOP_APP_NAME, route_prefix="/")
    return time.perf_counter() - t0


def delete_noop() -> None:
    """Delete the no-op app (Serve and its proxy stay) and leave the cluster, for `runner.start` to join it."""
    serve.delete(NOOP_APP_NAME)
    ray.shutdown()


def deploy_expertmesh(args: AppArgs, address: str, token: str, image: bytes, timeout_s: float = 600.0) -> dict[str, float]:
    """`runner.start` on the node, then Inspect until one is answered. Seconds from the start of the deploy to
    `runner.start` returning (`deploy_s`) and to the first answered request (`ready_s`)."""
    t0 = time.perf_counter()
    runner.start(args, address=address)
    deploy_s = time.perf_counter() - t0
    wait_until_answering(grpc_target(args.settings), token, image, timeout_s)
    return {"deploy_s": deploy_s, "ready_s": time.perf_counter() - t0}


def wait_until_answering(target: str, token: str, image: bytes, timeout_s: float) -> None:
    """Send Inspect (of `image`) until one is answered OK; raise after `timeout_s`."""
    request = pb.InspectRequest(factory_id=FACTORY_ID, image=image)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InspectionServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                stub.Inspect(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30.0)
                return
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
                time.sleep(0.2)
    raise RuntimeError(f"ExpertMesh at {target} answered no Inspect within {timeout_s:g} s (last: {last})")


def stop_expertmesh() -> None:
    runner.stop()


def expertmesh_rss(descendants_of: int | None = None) -> dict:
    """Resident memory of ExpertMesh's own Serve replica processes (`ray::ServeReplica:expertmesh:<Deployment>`),
    total and per deployment; Ray's daemons, Serve's controller and proxies are not counted. Replicas are found by
    their process titles in /proc (Ray's state API needs the dashboard, which `expertmesh serve` does not start);
    with `descendants_of`, only among that process's descendants (this machine may run other Rays)."""
    procs = _proc_table()
    pids = _descendants(procs, descendants_of) if descendants_of is not None else set(procs)
    by_deployment: dict[str, dict] = {}
    for pid in sorted(pids):
        title, _, rss = procs[pid]
        if not title.startswith("ray::" + REPLICA_PREFIX):
            continue
        deployment = title[len("ray::" + REPLICA_PREFIX):].split(".")[0].split()[0]
        entry = by_deployment.setdefault(deployment, {"num_processes": 0, "rss_bytes": 0})
        entry["num_processes"] += 1
        entry["rss_bytes"] += rss
    return {"rss_bytes": sum(e["rss_bytes"] for e in by_deployment.values()),
            "num_processes": sum(e["num_processes"] for e in by_deployment.values()),
            "by_deployment": dict(sorted(by_deployment.items()))}


def _proc_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (process title, parent pid, resident bytes), from /proc (processes that vanish meanwhile are skipped)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
            rss_kib = int(status.get("VmRSS", "0 kB").split()[0])
            table[int(entry.name)] = (title, int(status["PPid"].strip()), rss_kib * 1024)
        except (OSError, KeyError, ValueError):
            continue
    return table


def _descendants(procs: dict[int, tuple[str, int, int]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def weights_bytes(spec: CoESpec, zoo: Path) -> int:
    """The experts' total weight bytes: the sizes of every file of their checkpoints."""
    total = 0
    for expert in spec.experts:
        path = resolve_checkpoint(expert, zoo)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.exists() else []
        total += sum(p.stat().st_size for p in files)
    return total
