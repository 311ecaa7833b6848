"""`expertmesh bench simulate` (bench/simulate_*.py): the CoServe-scale workload and the command's three files."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from expertmesh.bench.simulate_command import register
from expertmesh.bench.simulate_workload import GIB, WorkloadSettings, build_workload, describe, machine

RESULT_OF_QUICK_RUN = """
import json
from expertmesh.bench.simulate_workload import WorkloadSettings, build_workload, machine
from expertmesh.cluster.simulate import simulate_policies
s = WorkloadSettings.quick(num_tasks=1)
out = simulate_policies(*build_workload(s), machine(s))
print(json.dumps({k: r.to_dict() for k, r in out.items()}, sort_keys=True))
"""


def test_the_default_workload_is_the_issues_scale():
    settings = WorkloadSettings(num_tasks=2)
    experts, requests = build_workload(settings)
    info = describe(experts, requests)
    assert info["num_experts"] - info["num_detectors"] == 350 and info["num_detectors"] >= 1
    assert 58 <= info["total_gib"] <= 62
    assert all(2500 <= n <= 3500 for n in info["task_sizes"])
    assert {r.arrival_ms for r in requests if r.task == 0} == {4.0 * i for i in range(info["task_sizes"][0])}
    config = machine(settings)
    assert (config.device_budget_bytes, config.host_budget_bytes) == (12 * GIB, 16 * GIB)
    assert config.disk_bytes_per_s == 530e6
    detectors = [e for e, x in experts.items() if x.upstreams]
    assert any(r.chain[-1] in detectors for r in requests)  # dependency chains
    counts = sorted((sum(1 for r in requests if r.chain[0] == e) for e in experts if e not in detectors),
                    reverse=True)
    assert counts[0] > 10 * counts[len(counts) // 2]  # skewed


def test_same_seed_same_results_in_fresh_processes_whatever_the_hash_seed():
    outputs = []
    for hash_seed in ("1", "2"):
        env = os.environ | {"PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", RESULT_OF_QUICK_RUN], env=env, capture_output=True, text=True,
                              timeout=120, check=True)
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])["expertmesh"]["num_requests"] > 0


def test_quick_command_writes_json_markdown_and_png(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="expertmesh")
    bench = parser.add_subparsers(dest="command").add_parser("bench").add_subparsers(dest="bench_command")
    register(bench)
    prefix = tmp_path / "out" / "sim"
    args = parser.parse_args(["bench", "simulate", "--quick", "--seed", "2", "--num-tasks", "1", "--out", str(prefix)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    for name in ("expertmesh", "fcfs_lru", "fcfs_fifo", "round_robin", "eviction_only", "evict_arrange"):
        assert f"{name}: " in printed
    doc = json.loads((tmp_path / "out" / "sim.json").read_text())
    assert doc["benchmark"] == "simulate" and doc["settings"]["workload"]["seed"] == 2
    assert "commit" in doc and doc["quick"] is True
    assert set(doc["policies"]) >= {"expertmesh", "fcfs_lru", "fcfs_fifo", "round_robin"}
    em = doc["policies"]["expertmesh"]
    assert {"throughput_per_s", "switches", "loads_from_host", "loads_from_disk", "p50_ms", "p99_ms"} <= set(em)
    assert doc["headline"]["speedup_vs_fcfs_lru"] == em["speedup_vs_fcfs_lru"]
    table = (tmp_path / "out" / "sim.md").read_text()
    assert "FCFS + LRU" in table and "4.5-12x" in table and "93.87%" in table
    assert (tmp_path / "out" / "sim.png").read_bytes()[:4] == b"\x89PNG"
