"""`expertmesh serve` against a cluster too small for the app (README "Serving": it refuses with FAILED_PRECONDITION
and the fix instead of waiting forever for replicas that cannot be placed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving_fixture import free_port

pytestmark = pytest.mark.integration

# a throwaway one-CPU Ray owned by this child driver: it prints the address and keeps the cluster until stdin closes
OWNER = """
import sys
from expertmesh.deployments.runner import keep_ray_on_loopback
keep_ray_on_loopback()
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""


def test_serve_refuses_a_cluster_too_small_for_the_initial_replicas(tmp_path, default_zoo):
    # RAY_AUTH_MODE: a new local Ray enables token auth by default (Ray 2.5x+), which a second process joins only
    # with the token; this throwaway cluster needs none
    env = {**os.environ, "EXPERTMESH_HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    owner = subprocess.Popen([sys.executable, "-c", OWNER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        address = owner.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        out = subprocess.run([sys.executable, "-m", "expertmesh.cli", "serve", "--zoo", str(default_zoo), "--address",
                              address, "--no-prometheus", "--grpc-port", str(free_port()), "--http-port",
                              str(free_port()), "--duration", "5"], env=env, capture_output=True, text=True, timeout=240)
    finally:
        owner.stdin.close()
        try:
            owner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            owner.kill()
    assert out.returncode == 2, out.stdout + out.stderr
    assert "the cluster has 1.00" in out.stderr and "logical CPUs" in out.stderr, out.stderr
    assert "fix: add nodes" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "serving after" not in out.stdout, out.stdout  # nothing was deployed
