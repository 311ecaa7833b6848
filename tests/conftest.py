"""Shared fixtures. The tiny zoo is the default spec scaled down to train in seconds."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from expertmesh.experts.spec import CoESpec, default_spec_path, parse_spec  # noqa: E402


def default_spec_data() -> dict:
    return yaml.safe_load(default_spec_path().read_text())


def tiny_spec_data() -> dict:
    """The pcb-aoi spec with every expert trained on a handful of images for one epoch."""
    data = copy.deepcopy(default_spec_data())
    data["num_eval_per_pair"] = 2
    for e in data["experts"]:
        e["training"] = {**e["training"], "num_train_per_label": 8, "epochs": 1, "batch_size": 16}
    return data


def lite_spec_data(own_expert: bool = False) -> dict:
    """`pcb-lite`: the same router, and one inspector for every category - the general expert's checkpoint under
    another name (so it must be shared, not loaded again). With `own_expert`, QFPs also get `lite_solder`:
    solder_fine's checkpoint pinned to the CPU, a version no other CoE serves (this CoE's own expert)."""
    data = copy.deepcopy(default_spec_data())
    general = next(e for e in data["experts"] if e["name"] == "general_defect")
    router = next(e for e in data["experts"] if e["task"] == "route")
    experts = [router, {**general, "name": "lite_inspector"}]
    if own_expert:
        solder = next(e for e in data["experts"] if e["name"] == "solder_fine")
        experts.append({**solder, "name": "lite_solder", "device": "cpu"})
    data.update(name="pcb-lite", description="one inspector for every part", experts=experts, dependencies=[],
                gating_rules=[])
    data["router"]["fallback_expert"] = "lite_inspector"
    for c in data["categories"]:
        c["experts"] = ["lite_inspector", "lite_solder"] if own_expert and c["name"] == "qfp" else ["lite_inspector"]
    return data


@pytest.fixture
def spec_data() -> dict:
    return copy.deepcopy(default_spec_data())


@pytest.fixture(scope="session")
def default_spec() -> CoESpec:
    return parse_spec(default_spec_data())


@pytest.fixture(scope="session")
def tiny_spec() -> CoESpec:
    return parse_spec(tiny_spec_data())


@pytest.fixture(scope="session")
def tiny_zoo(tiny_spec, tmp_path_factory) -> Path:
    from expertmesh.experts.zoo import build_zoo

    root = tmp_path_factory.mktemp("tiny-zoo")
    build_zoo(tiny_spec, root, baselines=(), progress=False, log=lambda *_: None)
    return root


@pytest.fixture(scope="session")
def default_zoo(default_spec) -> Path:
    """The real default zoo (`make test` builds it before pytest; built here if missing, which takes minutes)."""
    from expertmesh.experts.spec import default_zoo_root
    from expertmesh.experts.zoo import build_zoo

    root = default_zoo_root(default_spec)
    build_zoo(default_spec, root, baselines=(), progress=False)
    return root


@pytest.fixture(scope="session")
def serving(default_zoo, tmp_path_factory):
    """Ray + Serve with the default zoo deployed, gRPC and HTTP on loopback; shared by every integration test."""
    from serving_fixture import start_serving, stop_serving

    s = start_serving(default_spec_data(), default_zoo, tmp_path_factory.mktemp("serving"))
    yield s
    stop_serving()


def pytest_collection_modifyitems(items):
    """Tests on the shared Ray/Serve instance (the `serving` fixture) run last, in their files' order: the tests that
    start their own clusters (the 3-node node-loss test above all) then never share the 2 cores with it."""
    items.sort(key=lambda item: "serving" in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True)
def _cores_unchanged():
    """A test that pins this process to fewer cores would change what every later test measures and profiles (the
    profile's device is "<cpu> (<n> cpus)"): fail the test that leaks it, not a later one."""
    if not hasattr(os, "sched_getaffinity"):
        yield
        return
    cores = os.sched_getaffinity(0)
    yield
    leaked = os.sched_getaffinity(0)
    if leaked != cores:
        os.sched_setaffinity(0, cores)
        pytest.fail(f"this test left the process pinned to cores {sorted(leaked)} (it had {sorted(cores)})")


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with pytest's own exit status once every report is written, before the interpreter's teardown:
    that teardown (the native threads Ray, gRPC and torch leave) once crashed with SIGSEGV after a run whose 1087
    tests had all passed, and `make test` failed on the crash, not on a test."""
    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
