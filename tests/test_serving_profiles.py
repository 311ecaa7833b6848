"""One choice of profile entries: those of the device each expert is served on, for `expertmesh plan`, the
re-plan controller and the Serve app alike (no Ray, no training: fake checkpoints and entries)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertmesh.cli import main
from expertmesh.deployments.config import AppArgs, ServeSettings, app_profiles, deployment_options
from expertmesh.experts.spec import resolve_checkpoint
from expertmesh.home import expertmesh_home
from expertmesh.profiler.fit import LatencyFit
from expertmesh.profiler.serving_profiles import serving_batch, serving_device, serving_devices
from expertmesh.profiler.store import (BatchTiming, ExpertProfile, ProfileStore, checkpoint_sha256, current_versions,
                                       device_name)


def entry(expert: str, device: str, sha: str, name: str, peak_bytes: int) -> ExpertProfile:
    batches = [BatchTiming(batch_size=n, median_ms=n + 1.0, p10_ms=n + 0.9, p90_ms=n + 1.1, num_runs=3,
                           peak_bytes=peak_bytes * n) for n in (1, 2, 4)]
    return ExpertProfile(expert=expert, device=device, device_name=name, checkpoint_sha256=sha,
                         versions=current_versions(), measured_at="2026-11-26T00:00:00+00:00", num_parameters=10,
                         footprint_bytes=peak_bytes // 2, batches=batches,
                         fit=LatencyFit(k_ms_per_item=1.0, b_ms=1.0, r2=1.0, num_points=3), max_useful_batch=2,
                         moves=[], seconds=1.0)


@pytest.fixture
def zoo_and_store(default_spec, tmp_path):
    """A zoo of fake checkpoints and a store whose cpu entries are current (cuda entries: only with cuda=True)."""
    zoo = tmp_path / "zoo"

    def make(cuda: bool = False):
        store = ProfileStore(spec=default_spec.name)
        for e in default_spec.experts:
            ckpt = resolve_checkpoint(e, zoo)
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "model.safetensors").write_bytes(e.name.encode())
            sha = checkpoint_sha256(ckpt)
            store.put(entry(e.name, "cpu", sha, device_name("cpu"), peak_bytes=1000))
            if cuda:
                store.put(entry(e.name, "cuda", sha, "Fake GPU", peak_bytes=3000))
        path = tmp_path / "profile.json"
        store.save(path)
        return zoo, path
    return make


def test_the_served_device_comes_from_the_spec_and_the_gpus_only(default_spec):
    auto = default_spec.experts[0].model_copy(update={"device": "auto"})
    assert serving_device(auto, 0.0) == "cpu" and serving_device(auto, 0.25) == "cuda"
    assert serving_device(auto.model_copy(update={"device": "cpu"}), 1.0) == "cpu"
    assert serving_device(auto.model_copy(update={"device": "cuda"}), 1.0) == "cuda"
    assert set(serving_devices(default_spec, 0.0).values()) == {"cpu"}


def test_serving_takes_the_entries_of_the_device_its_experts_run_on(default_spec, zoo_and_store):
    zoo, store = zoo_and_store(cuda=True)
    args = AppArgs(zoo=str(zoo), tokens_file="t.yaml", profile=str(store))
    on_cpu = app_profiles(default_spec, args)
    on_gpu = app_profiles(default_spec, args.model_copy(update={"settings": ServeSettings(expert_num_gpus=0.5)}))
    assert set(on_cpu) == set(on_gpu) == {e.name for e in default_spec.experts}
    for e in default_spec.experts:  # a GPU entry is current on a host without one: its name is checked where it runs
        assert on_cpu[e.name].device == "cpu"
        assert on_gpu[e.name].device == serving_device(e, 0.5)
    gpu_opts = deployment_options(default_spec, ServeSettings(expert_num_gpus=0.5), on_gpu)
    # the host holds every expert: it gets the GPU share when any of them runs on cuda
    assert gpu_opts["Host"]["ray_actor_options"]["num_gpus"] == (0.5 if any(p.device == "cuda" for p in on_gpu.values())
                                                                 else 0)


def test_plan_uses_the_same_entries_as_serving(default_spec, zoo_and_store, tmp_path, capsys):
    zoo, store = zoo_and_store(cuda=False)
    plan = tmp_path / "plan.json"
    common = ["plan", "--zoo", str(zoo), "--profile", str(store), "--nodes", "2", "--node-memory-gb", "1"]
    assert main([*common, "--json", str(plan)]) == 0, capsys.readouterr().err
    assert set(json.loads(plan.read_text())["replicas"]) == {e.name for e in default_spec.experts}
    capsys.readouterr()
    # served on GPUs: the cpu entries do not apply, and the store has no cuda ones
    assert main([*common, "--expert-num-gpus", "1"]) == 2
    err = capsys.readouterr().err
    gpu_experts = [n for n, d in serving_devices(default_spec, 1.0).items() if d == "cuda"]
    assert "no current profile for" in err and all(n in err for n in gpu_experts), err


def test_the_serving_batch_is_the_largest_useful_one(default_spec):
    p = entry("chip_defect", "cpu", "0" * 64, "cpu", peak_bytes=1000)
    assert serving_batch(p).batch_size == 2
    assert serving_batch(p.model_copy(update={"max_useful_batch": 3})).batch_size == 4  # not measured: the largest


def test_home_is_the_variable_else_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path))
    assert expertmesh_home() == tmp_path
    monkeypatch.setenv("EXPERTMESH_HOME", "")
    assert expertmesh_home() == Path.home() / ".cache" / "expertmesh"
    monkeypatch.delenv("EXPERTMESH_HOME")
    assert expertmesh_home() == Path.home() / ".cache" / "expertmesh"


def test_plan_dedicates_experts_hot_enough_to_keep_a_replica_busy_and_says_why(zoo_and_store, tmp_path, capsys):
    zoo, store = zoo_and_store(cuda=False)
    plan = tmp_path / "plan.json"
    common = ["plan", "--zoo", str(zoo), "--profile", str(store), "--nodes", "2", "--node-memory-gb", "1", "--explain"]
    assert main(common) == 0
    quiet = capsys.readouterr().out
    assert ", device" in quiet and ", dedicated" not in quiet  # 20 requests/s keep no expert busy: all pooled
    assert main([*common, "--rps", "100000", "--json", str(plan)]) == 0
    busy = capsys.readouterr().out
    dedicated = {e: d for x in json.loads(plan.read_text())["executors"].values() for e, d in x["dedicated"].items()}
    assert dedicated and all(d["min_replicas"] >= 1 and d["max_replicas"] >= d["min_replicas"]
                             for d in dedicated.values())
    for e in dedicated:
        assert f"{e:<24}home, dedicated" in busy and f"dedicated {e}: " in busy and "replica-s/s (>= 0.5)" in busy
