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
