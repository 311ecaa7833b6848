"""The placement controller the way KubeRay runs it: no `expertmesh serve` process, only Ray nodes and a config.

The Helm chart is rendered; a Ray head and two workers are started with `ray start` and the chart's
rayStartParams, group resources and RAY_OVERRIDE_LABELS (the pod name as the node label), as KubeRay's
operator starts its pods; the chart's serveConfigV2 is submitted through the dashboard's REST API
(`PUT /api/serve/applications/`, what KubeRay calls). The controller the config runs (the `Placement`
deployment) plans on the live nodes and pins an expert host to each node it uses; a worker is killed
(a pod lost): the controller re-plans without it; then the same config is submitted again (KubeRay after
an operator restart): the running placement survives it - the same hosts, the same replica actors - and
the app answers. The config serves a second CoE (`coes`, as `expertmesh config --coe` writes it): the controller
plans both together, so the second CoE's own expert has planned nodes like every other, and it answers too.

What differs from a pod, and why: every node shares this machine's network, so each gets its own metrics and
dashboard-agent ports and the dashboard binds loopback on a free port; `ray start` will not join nodes on
loopback, so the nodes use this machine's own address (nothing leaves the machine); the config's zoo and tokens paths and its ports point at this
machine's instead of the pod's mounts.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from expertmesh.deployments.auth import write_dev_tokens
from expertmesh.deployments.config import HOST_DEPLOYMENT, PLACEMENT_DEPLOYMENT, host_name
from expertmesh.experts.images import encode_png
from expertmesh.experts.pcb_aoi import generator
from serving_fixture import free_port
from conftest import lite_spec_data
from test_helm import MINIMAL, by_kind, render

pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).with_name("ray"))


def ray_start_flags(params: dict) -> list[str]:
    """KubeRay's translation of rayStartParams: `--key=value` each."""
    return [f"--{k}={v}" for k, v in params.items()]


def pod_env(container: dict, pod_name: str, auth: dict) -> dict:
    """The container's env as a pod gets it ($(POD_NAME) expanded), plus what KubeRay adds for `authOptions`."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return {**{k: v.replace("$(POD_NAME)", pod_name) for k, v in env.items()}, **auth}


def http_json(url: str, *, method: str = "GET", body: dict | None = None, token: str = "", timeout: float = 30) -> dict:
    """A JSON call with `authorization: Bearer <token>` (a factory's token for the app, Ray's for the dashboard)."""
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read()
    return json.loads(text) if text else {}


class Pods:
    """`ray start --block` processes, one per pod, each in its own process group (killed together: a lost pod)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, {}

    def start(self, name: str, flags: list[str], env: dict) -> None:
        log = open(self.tmp / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen([RAY, "start", *flags, "--block"], env={**os.environ, **env},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, name: str) -> None:
        os.killpg(self.procs.pop(name).pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.procs):
            try:
                os.killpg(self.procs[name].pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait_for(what: str, check, timeout_s: float, every_s: float = 3.0):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except urllib.error.HTTPError as exc:
            last = f"{exc}: {exc.read()[:300]!r}"
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every_s)
    raise AssertionError(f"{what} not within {timeout_s:g} s; last: {last!r}")


def test_chart_config_under_kuberay_keeps_and_replans_the_placement(tmp_path, default_zoo):
    docs = render({**MINIMAL, "cpuWorkers": {"replicas": 2, "expertMemoryMiB": 64}})  # MINIMAL: the tokens
    svc = by_kind(docs, "RayService")[0]["spec"]
    head_spec = svc["rayClusterConfig"]["headGroupSpec"]
    group = svc["rayClusterConfig"]["workerGroupSpecs"][0]
    config = yaml.safe_load(svc["serveConfigV2"])
    # KubeRay's authOptions.mode token: a Secret's token in every Ray pod as RAY_AUTH_TOKEN, RAY_AUTH_MODE=token
    # (KubeRay reads it from the Secret authOptions names; here the pods get a fresh one, as pod_env shows)
    assert svc["rayClusterConfig"]["authOptions"]["mode"] == "token" and svc["rayClusterConfig"]["authOptions"]["secretName"]
    ray_token = secrets.token_hex(16)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_token}

    # this machine's paths and ports instead of the pod's
    token = write_dev_tokens(tmp_path / "tokens.yaml", ["factory-a"])["factory-a"]
    http_port, grpc_port, gcs_port, dash_port = free_port(), free_port(), free_port(), free_port()
    app = config["applications"][0]
    lite = tmp_path / "pcb-lite.yaml"  # a second CoE, with an expert of its own (lite_solder) and one it shares
    lite.write_text(yaml.safe_dump(lite_spec_data(own_expert=True), sort_keys=False))
    app["args"].update(zoo=str(default_zoo), tokens_file=str(tmp_path / "tokens.yaml"), coes=[str(lite)])
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")  # as `expertmesh config --coe` writes it
    ingress["user_config"]["coes"] = ["pcb-lite"]
    app["args"]["settings"].update(http_host="127.0.0.1", http_port=http_port, grpc_port=grpc_port)
    config["http_options"].update(host="127.0.0.1", port=http_port)
    config["grpc_options"]["port"] = grpc_port
    assert app["args"]["settings"]["placement_controller"] is True  # the chart's config runs the controller

    loopback = ["--node-ip-address=127.0.0.1"]
    head_params = {**head_spec["rayStartParams"], "dashboard-host": "127.0.0.1", "dashboard-port": dash_port,
                   "metrics-export-port": free_port(), "dashboard-agent-listen-port": free_port(), "port": gcs_port}
    pods = Pods(tmp_path)
    # "1": what a pod has (Ray's default); this test process may hold "0" from the loopback tests, and `ray start`
    # refuses to join a cluster under "0"
    base_env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                "EXPERTMESH_HOME": str(tmp_path), "RAY_ADDRESS": ""}
    head_container = head_spec["template"]["spec"]["containers"][0]
    worker_container = group["template"]["spec"]["containers"][0]
    dashboard = f"http://127.0.0.1:{dash_port}"
    workers = ["aoi-cpu-worker-0", "aoi-cpu-worker-1"]
    try:
        pods.start("aoi-head", ["--head", *ray_start_flags(head_params), *loopback],
                   {**base_env, **pod_env(head_container, "aoi-head", auth)})
        wait_for("the dashboard", lambda: http_json(f"{dashboard}/api/version", token=ray_token), 120)
        cpus = worker_container["resources"]["limits"]["cpu"]  # KubeRay sets num-cpus from the container's limit
        for name in workers:
            params = {**group["rayStartParams"], "metrics-export-port": free_port(), "num-cpus": cpus,
                      "dashboard-agent-listen-port": free_port(),
                      "resources": json.dumps(group["resources"] and {k: float(v) for k, v in group["resources"].items()}),
                      "address": f"127.0.0.1:{gcs_port}"}
            pods.start(name, [*ray_start_flags(params), *loopback], {**base_env, **pod_env(worker_container, name, auth)})
            time.sleep(5)  # one raylet at a time: two starting at once on 2 cores can miss Ray's registration timeout

        def nodes_up():
            nodes = http_json(f"{dashboard}/nodes?view=summary", token=ray_token)["data"]["summary"]
            return len([n for n in nodes if n["raylet"]["state"] == "ALIVE"]) == 3
        wait_for("three Ray nodes", nodes_up, 120)

        # KubeRay submits serveConfigV2
        submitted_s = time.monotonic()
        http_json(f"{dashboard}/api/serve/applications/", method="PUT", body=config, token=ray_token)

        def placement():
            return http_json(f"http://127.0.0.1:{http_port}/v1/placement", token=token)

        def hosts():
            """host deployments -> their RUNNING replicas' actor ids and nodes (from Serve's REST view)."""
            apps = http_json(f"{dashboard}/api/serve/applications/", token=ray_token)["applications"]
            deps = apps["expertmesh"]["deployments"] if "expertmesh" in apps else {}
            return {name: sorted((r["actor_id"], r["node_id"]) for r in d["replicas"] if r["state"] == "RUNNING")
                    for name, d in deps.items() if name.startswith(HOST_DEPLOYMENT)}

        def app_running():
            apps = http_json(f"{dashboard}/api/serve/applications/", token=ray_token)["applications"]
            return apps.get("expertmesh", {}).get("status") == "RUNNING"

        # the controller plans on the two workers (the head offers experts no memory) and the app is rebuilt with it
        first = wait_for("a first placement applied", lambda: (p := placement())["revision"] >= 1 and app_running()
                         and set(hosts()) == {host_name(n) for ns in p["placement"].values() for n in ns} and p, 420)
        first_s = time.monotonic() - submitted_s
        used = sorted({n for ns in first["placement"].values() for n in ns})
        assert set(used) <= set(workers) and used, first
        # both CoEs planned together: the second's own expert is placed by its serving key, the shared one once
        own = [k for k in first["placement"] if k.startswith("lite_solder@")]
        assert len(own) == 1 and first["placement"][own[0]] and "lite_inspector" not in first["placement"], first
        assert first["planned_from"] == "checkpoints" and "node joined" in first["reason"], first
        assert HOST_DEPLOYMENT not in hosts()  # the unpinned host the app started with is gone
        assert PLACEMENT_DEPLOYMENT in http_json(f"{dashboard}/api/serve/applications/", token=ray_token)["applications"]["expertmesh"][
            "deployments"]

        # a worker pod is lost: the controller re-plans on what is left
        lost = used[-1]
        lost_at_s = time.monotonic()
        pods.kill(lost)
        after = wait_for("a re-plan without the lost node", lambda: (p := placement())["revision"] > first["revision"]
                         and app_running() and set(hosts()) == {host_name(n) for ns in p["placement"].values()
                                                                for n in ns} and p, 300)
        replanned_s = time.monotonic() - lost_at_s
        assert lost not in {n for ns in after["placement"].values() for n in ns}, after
        assert "node lost: " + lost in after["reason"], after
        running = {name: sorted(node for _, node in replicas) for name, replicas in hosts().items()}

        # KubeRay re-submits the same serveConfigV2 (an operator restart empties its cache): nothing moves
        resubmitted_at_s = time.monotonic()
        http_json(f"{dashboard}/api/serve/applications/", method="PUT", body=config, token=ray_token)
        time.sleep(10)
        wait_for("the app running after the re-submission", app_running, 180)
        assert placement()["placement"] == after["placement"]
        wait_for("the same expert hosts on the same nodes", lambda: {
            name: sorted(node for _, node in replicas) for name, replicas in hosts().items()} == running, 180)
        resubmit_s = time.monotonic() - resubmitted_at_s

        # and it answers
        image = encode_png(generator.generate("chip_resistor", "ok", 7, 0))
        answer = http_json(f"http://127.0.0.1:{http_port}/v1/inspect", method="POST", token=token,
                           body={"factory_id": "factory-a", "image": base64.b64encode(image).decode()}, timeout=60)
        assert answer["verdict"] in ("PASS", "DEFECT", "UNCERTAIN") and len(answer["experts"]) >= 2, answer
        qfp = encode_png(generator.generate("qfp", "ok", 7, 0))
        answer = http_json(f"http://127.0.0.1:{http_port}/v1/inspect", method="POST", token=token, timeout=60,
                           body={"factory_id": "factory-a", "image": base64.b64encode(qfp).decode(), "coe": "pcb-lite"})
        assert answer["coe_version"] == "pcb-lite@1" and answer["verdict"] in ("PASS", "DEFECT", "UNCERTAIN"), answer
        assert own[0] in after["placement"], after  # the re-plan kept planning it
        print("kuberay placement figures: " + json.dumps({  # bench/figures.py records this line (group kuberay)
            "first_placement_running_s": round(first_s, 1), "lost_node": lost, "replan_running_s": round(replanned_s, 1),
            "resubmitted_running_s": round(resubmit_s, 1), "nodes_used_first": used,
            "nodes_used_after": sorted({n for ns in after["placement"].values() for n in ns}),
            "planned_from": first["planned_from"]}), flush=True)
    finally:
        pods.stop_all()
