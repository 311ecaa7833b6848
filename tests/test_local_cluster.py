"""`expertmesh up / status / down`: a real multi-node Ray cluster on loopback, driven through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from serving_fixture import free_port

pytestmark = pytest.mark.integration


def cli(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expertmesh.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_up_status_down_on_loopback(tmp_path):
    env = {**os.environ, "EXPERTMESH_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    ports = ["--metrics-base-port", str(free_port()), "--dashboard-port", str(free_port())]
    up = cli(env, "up", "--nodes", "2", "--gpus-per-node", "1", "--node-memory-gb", "0.5", "--pool", "factory-a", *ports)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((tmp_path / "cluster" / "state.json").read_text())
        assert state["address"].startswith("127.0.0.1:") and len(state["nodes"]) == 2
        again = cli(env, "up", "--nodes", "2")
        assert again.returncode == 2 and "already up" in again.stderr
        status = cli(env, "status")
        assert status.returncode == 0, status.stderr
        rows = [line.split() for line in status.stdout.splitlines() if line.startswith("node-")]
        assert [r[0] for r in rows] == ["node-0", "node-1"]
        assert all(r[1] == "True" and r[2] == "factory-a" and r[4] == "1" and r[5] == "512" for r in rows), rows
    finally:
        down = cli(env, "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not (tmp_path / "cluster" / "state.json").exists()
    assert "no local cluster" in cli(env, "down").stdout


def test_bad_cluster_options_name_the_flag(tmp_path):
    env = {**os.environ, "EXPERTMESH_HOME": str(tmp_path)}
    out = cli(env, "up", "--nodes", "0")
    assert out.returncode == 2 and "--nodes" in out.stderr and "got 0" in out.stderr, out.stderr


@pytest.mark.slow
def test_a_plan_puts_replicas_on_the_planned_nodes(tmp_path, default_zoo):
    """3 loopback nodes; profile, plan from the live inventory, serve with the plan, and check with Ray's state
    API (expertmesh status) that every replica sits on a node its plan names."""
    import signal
    import time

    env = {**os.environ, "EXPERTMESH_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    zoo = ["--zoo", str(default_zoo)]
    profile = str(tmp_path / "profile.json")
    out = cli(env, "profile", *zoo, "--out", profile, "--runs", "3", "--max-batch", "8", "--usage", "spec",
              "--no-progress", "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 0, out.stderr[-2000:]
    up = cli(env, "up", "--nodes", "3", "--node-memory-gb", "0.06", "--metrics-base-port", str(free_port()),
             "--dashboard-port", str(free_port()))
    serve = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        plan_path = tmp_path / "plan.json"
        out = cli(env, "plan", *zoo, "--profile", profile, "--json", str(plan_path))
        assert out.returncode == 0 and "nodes from the live cluster" in out.stderr, out.stderr[-2000:]
        planned = json.loads(plan_path.read_text())["replicas"]
        assert len({n for ns in planned.values() for n in ns}) >= 2  # the memory forces a real partition
        address = json.loads((tmp_path / "cluster" / "state.json").read_text())["address"]
        grpc_port = free_port()
        serve = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", "serve", *zoo, "--address", address,
                                  "--profile", profile, "--plan", str(plan_path), "--grpc-port", str(grpc_port),
                                  "--http-port", str(free_port()), "--no-prometheus", "--duration", "600"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        placed: dict[str, list[str]] = {}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not set(planned) <= set(placed):
            time.sleep(5)
            status = cli(env, "status")
            placed = {line.split(":")[0].strip(): [n.strip() for n in line.split(":", 1)[1].split(",")]
                      for line in status.stdout.splitlines() if line.startswith("  ")}
        for expert, nodes in planned.items():
            assert expert in placed, (expert, placed)
            assert set(placed[expert]) <= set(nodes), (expert, placed[expert], nodes)
        assert set(placed["solder_fine"]) == set(planned["solder_fine"]) or len(planned["solder_fine"]) == 1

        # a station run: the plan's expert calls of a request (everything after the router's classifier) run on one
        # node whenever the plan co-locates them (this plan cuts nothing, so: every request)
        import yaml

        token = next(t for t, f in yaml.safe_load((tmp_path / "dev-tokens.yaml").read_text()).items() if f == "factory-a")
        traces = tmp_path / "traces.jsonl"
        st = cli(env, "station", "--target", f"127.0.0.1:{grpc_port}", "--token", token, "--factory", "factory-a",
                 "--rate", "8", "--duration", "12", "--traces", str(traces), "--no-progress")
        assert st.returncode == 0 and "errors by code: none" in st.stdout, st.stdout + st.stderr
        records = [json.loads(line) for line in traces.read_text().splitlines()]
        cut = json.loads(plan_path.read_text())["cut_weight"]
        one_node = [len({t["node_id"] for t in r["experts"] if t["reason"] != "router"}) <= 1 for r in records]
        print(f"co-location: {sum(one_node)}/{len(records)} requests ran their plan on one node (plan cut {cut})")
        assert len(records) >= 50
        if cut == 0:
            assert sum(one_node) / len(records) >= 0.95
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve.kill()
        cli(env, "down")
