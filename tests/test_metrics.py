"""Metric declarations, the shipped dashboard, and the residency policy: pure, no Ray."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from expertmesh.cluster.prometheus import prometheus_config
from expertmesh.deployments.dashboard import SHIPPED_PATH, build_dashboard, dashboard_json, queries
from expertmesh.experts.residency import ResidencyConfig, ResidencySnapshot, decide, memory_budget_bytes
from expertmesh.experts.runtime import Tier
from expertmesh.metrics import BY_NAME, METRICS, OTHER, label_or_other


def test_names_are_unique_prefixed_and_carry_units():
    assert len(BY_NAME) == len(METRICS)
    for m in METRICS:
        assert re.fullmatch(r"expertmesh_[a-z_]+", m.name), m.name
        if m.kind == "counter":
            assert m.name.endswith("_total"), m.name
        elif m.kind == "histogram":
            assert m.name.endswith("_seconds") and list(m.boundaries) == sorted(m.boundaries), m.name
        else:
            assert not m.name.endswith("_total"), m.name
            assert m.name.endswith(("_bytes", "_depth", "_replicas")), m.name
        assert all(re.fullmatch(r"[a-z][a-z_]*", k) for k in m.tag_keys), m.tag_keys
        assert "le" not in m.tag_keys and m.description


def test_label_values_are_bounded():
    assert label_or_other("factory-a", {"factory-a", "none"}) == "factory-a"
    assert label_or_other("'; DROP TABLE", {"factory-a"}) == OTHER


def test_shipped_dashboard_is_current():
    assert json.loads(SHIPPED_PATH.read_text()) == build_dashboard(), \
        "regenerate it: expertmesh dashboard --out deployments/grafana/expertmesh-dashboard.json"
    assert SHIPPED_PATH.read_text() == dashboard_json()


def test_dashboard_queries_use_declared_metrics_and_defined_variables():
    d = build_dashboard()
    exported = {m.exported for m in METRICS}
    variables = {v["name"] for v in d["templating"]["list"]} | {"__rate_interval", "__range"}
    qs = queries(d)
    assert len(qs) >= 20
    for title, expr in qs:
        for name in re.findall(r"ray_expertmesh_\w+", expr):
            assert re.sub(r"_(bucket|sum|count)$", "", name) in exported, (title, name)
        for var in re.findall(r"\$(\w+)", expr):
            assert var in variables, (title, var)
    titles = " ".join(p["title"] for p in d["panels"]).lower()
    for needed in ("hit rate", "category mix", "invocations", "switches", "load latency", "latency p50 / p99",
                   "verdicts", "errors", "memory", "placement"):
        assert needed in titles, needed
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_config_reads_targets_from_a_file(tmp_path):
    cfg = prometheus_config(tmp_path / "targets.json", 2.0)
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg
    assert cfg["global"]["scrape_interval"] == "2s"
    assert cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(tmp_path / "targets.json")]


# ---------------------------------------------------------------------- residency policy (injected clock)
CFG = ResidencyConfig(device_idle_s=10, host_idle_s=30)


@pytest.mark.parametrize("tier, idle_s, expected", [
    (Tier.DEVICE, 5, None),
    (Tier.DEVICE, 10, Tier.HOST),
    (Tier.HOST, 20, None),
    (Tier.HOST, 30, Tier.DISK),
    (Tier.DEVICE, 31, Tier.DISK),  # long idle on the device: straight to disk
    (Tier.DISK, 1000, None),
])
def test_idle_experts_move_down(tier, idle_s, expected):
    assert decide(CFG, ResidencySnapshot(tier, last_used_s=100.0), now_s=100.0 + idle_s) is expected


def test_busy_or_unconfigured_experts_stay():
    # a replica running a batch (deployments/expert.py sets busy from preprocessing to results) is never moved down,
    # however long since its last batch ended; the same replica idle drops straight to disk
    for tier in (Tier.DEVICE, Tier.HOST):
        assert decide(CFG, ResidencySnapshot(tier, 0.0, busy=True), 1000.0) is None
        assert decide(CFG, ResidencySnapshot(tier, 0.0, busy=False), 1000.0) is Tier.DISK
    assert decide(ResidencyConfig(), ResidencySnapshot(Tier.DEVICE, 0.0), 1e9) is None
    assert not ResidencyConfig().enabled and CFG.enabled


def test_host_timeout_below_device_timeout_is_refused():
    with pytest.raises(ValueError, match="host_idle_s .* fix"):
        ResidencyConfig(device_idle_s=10, host_idle_s=5)


# ---------------------------------------------------------------------- the node memory budget gauge's number
GIB = 2 ** 30


@pytest.mark.parametrize("declared_mib, device_bytes, host, device", [
    (61, None, 61 * 2**20, 61 * 2**20),  # a CPU node declaring 61 MiB: the device is host memory, one budget
    (80 * 1024, 80 * GIB, 64 * GIB, 80 * GIB),  # a GPU node: declared device memory; the host tier is the machine's
    (None, None, 64 * GIB, 64 * GIB),  # nothing declared: fall back to the machine ...
    (0, 40 * GIB, 64 * GIB, 40 * GIB),  # ... and to the whole GPU
])
def test_the_memory_budget_is_what_the_node_declares(declared_mib, device_bytes, host, device):
    budget = memory_budget_bytes(declared_mib, machine_bytes=64 * GIB, device_bytes=device_bytes)
    assert budget == {Tier.HOST: host, Tier.DEVICE: device}


def test_a_negative_declared_budget_is_refused():
    with pytest.raises(ValueError, match="expertmesh_memory_mib is -1.*fix"):
        memory_budget_bytes(-1, machine_bytes=GIB, device_bytes=None)


def test_the_metrics_reference_is_the_declarations():
    """docs/observability.md's table is `reference_table()`: every declared metric, its labels and meaning."""
    from pathlib import Path

    from expertmesh.metrics import reference_table

    doc = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text()
    assert reference_table() in doc, "regenerate the table: python -c 'from expertmesh.metrics import " \
                                     "reference_table; print(reference_table())'"
