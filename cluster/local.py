"""A real multi-node Ray cluster on this machine, all on loopback: `expertmesh up / down / status`.

`up` starts a detached supervisor process that owns the cluster (`ray.cluster_utils.Cluster`, how Ray
tests itself: a head and N-1 workers, each its own raylet with its own metrics export port) and
writes a state file; `down` signals the supervisor, which shuts every node down. Each node carries
the labels `expertmesh.io/node=<name>` and `expertmesh.io/pool=<pool>`, declared logical GPUs, and its
device-memory capacity as the custom resource `expertmesh_memory_mib` - what the placement
controller plans against. The head runs Ray's dashboard so the state API can say where actors run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.cluster.connect import connect, keep_ray_on_loopback
from expertmesh.cluster.labels import MEMORY_RESOURCE, NODE_LABEL, POOL_LABEL
from expertmesh.cluster.placement import NodeCapacity
from expertmesh.errors import FailedPrecondition, InvalidArgument, Unavailable
from expertmesh.home import expertmesh_home


class LocalClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_nodes: int = Field(3, ge=1, le=16)
    gpus_per_node: int = Field(0, ge=0, le=16, description="logical GPUs declared per node")
    node_memory_gb: float = Field(16.0, gt=0, description="device memory each node offers experts, GiB")
    cpus_per_node: float = Field(4.0, gt=0, description="logical CPUs per node (a scheduling budget)")
    pool: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    metrics_base_port: int = Field(8080, ge=1024, le=65000, description="node i serves metrics on base + i")
    dashboard_port: int = Field(8265, ge=1024, le=65535)

    def node_name(self, i: int) -> str:
        return f"node-{i}"

    def node_args(self, i: int) -> dict:
        return {"num_cpus": self.cpus_per_node, "num_gpus": self.gpus_per_node, "node_ip_address": "127.0.0.1",
                "labels": {NODE_LABEL: self.node_name(i), POOL_LABEL: self.pool},
                "resources": {MEMORY_RESOURCE: int(self.node_memory_gb * 1024)},
                "metrics_export_port": self.metrics_base_port + i}


def default_state_path() -> Path:
    return expertmesh_home() / "cluster" / "state.json"


# ------------------------------------------------------------------ the supervisor (a detached process)
def supervise(cfg: LocalClusterConfig, state_path: Path) -> None:
    """Start the cluster, write the state file, and keep it up until SIGTERM/SIGINT."""
    keep_ray_on_loopback()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray is imported only in the supervisor process (and `describe`): the CLI side of this module stays fast
    from ray.cluster_utils import Cluster

    stop = {"now": False}

    def on_signal(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    head = {**cfg.node_args(0), "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": cfg.dashboard_port}
    cluster = Cluster(initialize_head=True, head_node_args=head, shutdown_at_exit=True)
    workers = {}
    try:
        for i in range(1, cfg.num_nodes):
            workers[cfg.node_name(i)] = cluster.add_node(**cfg.node_args(i))
        cluster.wait_for_nodes()
        state = {"pid": os.getpid(), "address": cluster.address, "dashboard": f"http://127.0.0.1:{cfg.dashboard_port}",
                 "config": cfg.model_dump(), "nodes": [
                     {"name": cfg.node_name(i), "metrics": f"127.0.0.1:{cfg.metrics_base_port + i}"}
                     for i in range(cfg.num_nodes)]}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_path)
        while not stop["now"]:
            time.sleep(0.5)
            for request in state_path.parent.glob("remove-*"):  # `expertmesh node remove NAME`
                name = request.name.removeprefix("remove-")
                request.unlink(missing_ok=True)
                if name in workers:
                    cluster.remove_node(workers.pop(name))
                    print(f"removed {name}", flush=True)
    finally:
        cluster.shutdown()
        state_path.unlink(missing_ok=True)


# ------------------------------------------------------------------ the CLI side
def read_state(state_path: Path | None = None) -> dict | None:
    path = state_path or default_state_path()
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(state["pid"], 0)
    except (OSError, KeyError):
        path.unlink(missing_ok=True)  # its supervisor is gone
        return None
    return state


def up(cfg: LocalClusterConfig, state_path: Path | None = None, timeout_s: float = 180.0, attempts: int = 2) -> dict:
    """Start the cluster; a start that fails (Ray gives a raylet 30 s to register, which a loaded 2-core machine
    can miss) is retried once from scratch."""
    path = state_path or default_state_path()
    if (state := read_state(path)) is not None:
        raise FailedPrecondition(f"a local cluster is already up at {state['address']}", field="cluster",
                                 fix="use it, or run `expertmesh down` first")
    for attempt in range(1, attempts + 1):
        try:
            return _up_once(cfg, path, timeout_s)
        except Unavailable:
            if attempt == attempts:
                raise
            print(f"the cluster did not start (attempt {attempt}); trying again", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def _up_once(cfg: LocalClusterConfig, path: Path, timeout_s: float) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_name("supervisor.log")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "expertmesh.cluster.local", path.as_posix(), cfg.model_dump_json()],
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise Unavailable(f"the cluster supervisor exited with {proc.returncode}: {tail.strip()[-500:]}",
                              fix=f"see {log}; ports {cfg.metrics_base_port}+ and {cfg.dashboard_port} must be free")
        if (state := read_state(path)) is not None:
            return state
        time.sleep(0.5)
    proc.terminate()
    raise Unavailable(f"the cluster was not up within {timeout_s:g} s", fix=f"see {log}")


def down(state_path: Path | None = None, timeout_s: float = 60.0) -> bool:
    """Stop the local cluster; False when none was up."""
    path = state_path or default_state_path()
    state = read_state(path)
    if state is None:
        return False
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(state["pid"], 0)
        except OSError:
            return True
        time.sleep(0.3)
    os.kill(state["pid"], signal.SIGKILL)
    path.unlink(missing_ok=True)
    return True


def remove_node(name: str, state_path: Path | None = None, timeout_s: float = 30.0) -> None:
    """Ask the supervisor to take a worker node down (the head cannot be removed); returns once it is gone."""
    path = state_path or default_state_path()
    state = read_state(path)
    if state is None:
        raise FailedPrecondition("no local cluster is up", field="cluster", fix="run `expertmesh up` first")
    names = [n["name"] for n in state["nodes"]]
    if name not in names[1:]:
        raise InvalidArgument(f"{name!r} is not a worker node of the local cluster", field="node",
                              fix=f"use one of: {', '.join(names[1:]) or 'none (only the head is up)'}")
    request = path.with_name(f"remove-{name}")
    request.touch()
    deadline = time.monotonic() + timeout_s
    while request.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if request.exists():
        raise Unavailable(f"the supervisor did not remove {name} within {timeout_s:g} s", fix="see supervisor.log")


def describe(address: str) -> dict:
    """Nodes (name, labels, capacity, alive) and where each Serve replica runs, from the live cluster."""
    ray = connect(address)
    nodes = []
    names = {}
    for n in sorted(ray.nodes(), key=lambda n: n.get("Labels", {}).get(NODE_LABEL, n["NodeID"])):
        labels = n.get("Labels", {})
        name = labels.get(NODE_LABEL, n["NodeID"][:12])
        names[n["NodeID"]] = name
        res = n.get("Resources", {})
        nodes.append({"name": name, "alive": n["Alive"], "pool": labels.get(POOL_LABEL, ""),
                      "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0),
                      "memory_mib": res.get(MEMORY_RESOURCE, 0), "metrics_port": n.get("MetricsExportPort")})
    replicas: dict[str, list[str]] = {}
    try:
        from ray.util.state import list_actors  # Ray's state API: imported with Ray, on a cluster command only

        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000):
            if a.class_name.startswith("ServeReplica:"):
                deployment = a.class_name.split(":")[-1]
                replicas.setdefault(deployment, []).append(names.get(a.node_id, a.node_id[:12]))
    except Exception as exc:  # noqa: BLE001 - the state API needs the dashboard; say so instead of failing
        replicas = {"(unknown)": [f"state API unavailable: {type(exc).__name__}"]}
    return {"nodes": nodes, "replicas": {k: sorted(v) for k, v in sorted(replicas.items())}}


def inventory(desc: dict) -> list[NodeCapacity]:
    """The alive nodes of `describe()` as the planner's NodeCapacity (memory from `expertmesh_memory_mib`)."""
    nodes = [NodeCapacity(name=n["name"], memory_bytes=int(n["memory_mib"] * 2**20), labels={POOL_LABEL: n["pool"]},
                          cpus=n["cpus"])
             for n in desc["nodes"] if n["alive"] and n["memory_mib"] > 0]
    if not nodes:
        raise FailedPrecondition("no alive node declares device memory", field="cluster",
                                 fix="start nodes with `expertmesh up` (it declares expertmesh_memory_mib)")
    return nodes


def format_status(desc: dict, address: str) -> str:
    lines = [f"cluster {address}", f"{'node':<10}{'alive':<7}{'pool':<10}{'CPUs':>6}{'GPUs':>6}{'memory MiB':>12}{'metrics':>9}"]
    for n in desc["nodes"]:
        lines.append(f"{n['name']:<10}{str(n['alive']):<7}{n['pool']:<10}{n['cpus']:>6g}{n['gpus']:>6g}"
                     f"{n['memory_mib']:>12g}{n['metrics_port'] or '-':>9}")
    if desc["replicas"]:
        lines.append("replicas (deployment: nodes)")
        lines += [f"  {d}: {', '.join(ns)}" for d, ns in desc["replicas"].items()]
    else:
        lines.append("no Serve replicas running")
    return "\n".join(lines)


if __name__ == "__main__":  # the supervisor: python -m expertmesh.cluster.local STATE_PATH CONFIG_JSON
    supervise(LocalClusterConfig.model_validate_json(sys.argv[2]), Path(sys.argv[1]))
