"""The Helm chart, offline: strict lint, renders with default and two-factory values, every core object valid for
Kubernetes, the RayService valid for KubeRay's CRD (no unknown fields), serveConfigV2 == `expertmesh config`, the
dashboard and tokens as the code expects them, and bad values refused by values.schema.json."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from expertmesh.cli import main
from expertmesh.deployments.config import AppArgs, deployment_options
from expertmesh.experts.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "expertmesh"
CRD = Path(__file__).parent / "kuberay" / "ray.io_rayservices.yaml"  # KubeRay's RayService CRD (see its README)
KUBE_VERSION = "1.30.0"
CONFIG_FLAGS = ["--zoo", "/models/zoo/pcb-aoi", "--tokens", "/etc/expertmesh/tokens/tokens.yaml", "--no-profile",
                "--http-host", "0.0.0.0", "--placement-controller"]  # how files/serve-config.yaml is made (`make chart`)


def two_factories() -> dict:
    return yaml.safe_load((CHART / "examples" / "two-factories.yaml").read_text())


def render(values: dict | None = None) -> list[dict]:
    out = helm.Chart.load(str(CHART)).render(values, name="aoi", namespace="inspection", is_install=True)
    return [d for path, text in out.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the CRD's structural schema does not declare (the API server would prune or reject them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key in schema["properties"]:
                out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
            elif "additionalProperties" not in schema:
                out.append(f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            out += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("values", [None, two_factories()], ids=["default", "two-factories"])
def test_the_chart_lints_strictly(values):
    report = helm.lint(str(CHART), values, strict=True, namespace="inspection", kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("values", [None, two_factories()], ids=["default", "two-factories"])
def test_every_rendered_object_validates(values, crd_schema):
    import jsonschema

    docs = render(values)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "RayService", "Secret", "Service", "Service", "Service"]
    assert kinds == sorted(expected + (["PodMonitor"] if values else [])), kinds
    for d in docs:
        if d["apiVersion"] == "v1":  # core objects: Kubernetes' own schemas, unknown fields refused
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    (rs,) = by_kind(docs, "RayService")
    jsonschema.Draft7Validator(crd_schema).validate(rs)
    assert unknown_fields(rs, crd_schema) == []
    (pm,) = by_kind(docs, "PodMonitor") or [None]
    if pm is not None:
        assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_the_services_stations_use():
    services = {s["metadata"]["name"]: s for s in by_kind(render(), "Service")}
    assert set(services) == {"aoi-expertmesh-grpc", "aoi-expertmesh-http", "aoi-expertmesh-metrics"}
    assert services["aoi-expertmesh-grpc"]["spec"]["ports"][0]["port"] == 9000
    assert services["aoi-expertmesh-http"]["spec"]["ports"][0]["port"] == 8000
    assert services["aoi-expertmesh-metrics"]["spec"]["ports"][0]["port"] == 8080
    assert services["aoi-expertmesh-grpc"]["spec"]["selector"]["ray.io/serve"] == "true"


def _config(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "serve.yaml"
    assert main(["config", *CONFIG_FLAGS, *extra, "--out", str(out)]) == 0
    return yaml.safe_load(out.read_text())


def test_serve_config_v2_is_what_expertmesh_config_writes(tmp_path):
    (rs,) = by_kind(render(), "RayService")
    assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == _config(tmp_path), "run `make chart` to refresh the bundle"
    gpu_text = tmp_path / "gpu.yaml"
    gpu = _config(tmp_path, "--expert-num-gpus", "0.25")
    gpu_text.write_text(yaml.safe_dump(gpu))
    (rs,) = by_kind(render({**two_factories(), "serveConfig": gpu_text.read_text()}), "RayService")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert config == gpu
    # the hosts' options are not listed (a placement renames them): the app builds them from the settings in args
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert args.settings.expert_num_gpus == 0.25
    hosts = [o for name, o in deployment_options(load_spec(None), args.settings).items() if name.startswith("Host")]
    assert hosts and all(o["ray_actor_options"]["num_gpus"] == 0.25 for o in hosts)


def test_gpu_groups_carry_gpus_labels_and_memory():
    (rs,) = by_kind(render(two_factories()), "RayService")
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "factory-a-l4", "factory-b-a100"}
    b = groups["factory-b-a100"]
    container = b["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2 and b["rayStartParams"]["num-gpus"] == "2"
    assert b["resources"] == {"expertmesh_memory_mib": str(2 * 40 * 1024)}  # what the placement planner reads
    labels = json.loads(next(e["value"] for e in container["env"] if e["name"] == "RAY_OVERRIDE_LABELS"))
    assert labels == {"expertmesh.io/node": "$(POD_NAME)", "expertmesh.io/pool": "factory-b"}
    assert b["template"]["spec"]["nodeSelector"] == {"factory": "factory-b"}
    assert {"key": "factory-b-only", "operator": "Exists", "effect": "NoSchedule"} in b["template"]["spec"]["tolerations"]


def test_tokens_and_dashboard_are_what_the_code_reads(tmp_path):
    from expertmesh.deployments.auth import TokenTable
    from expertmesh.deployments.dashboard import build_dashboard

    docs = render()
    (secret,) = by_kind(docs, "Secret")
    path = tmp_path / "tokens.yaml"
    path.write_text(secret["stringData"]["tokens.yaml"])
    assert sorted(TokenTable.load(str(path)).factories_by_token.values()) == ["factory-a", "factory-b"]
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["expertmesh-dashboard.json"]) == build_dashboard(), "run `make chart`"
    (rs,) = by_kind(render({"tokens": {"existingSecret": "factory-tokens", "key": "t.yaml",
                                       "mountPath": "/etc/expertmesh/tokens"}}), "RayService")
    volumes = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "tokens", "secret": {"secretName": "factory-tokens"}} in volumes


@pytest.mark.parametrize("bad, field", [
    ({"gpuGroups": [{"name": "factory-a", "pool": "factory-a", "gpusPerPod": 0, "gpuMemoryGiB": 24}]}, "gpusPerPod"),
    ({"gpuGroups": [{"name": "factory-a", "pool": "factory-a", "gpuMemoryGiB": 24}]}, "gpusPerPod"),
    ({"image": {"repository": "", "tag": "0.1.0"}}, "repository"),
    ({"image": {"repository": None, "tag": "0.1.0"}}, "repository"),  # null removes the default
    ({"models": {"source": "pvc", "mountPath": "/models"}}, "pvc"),
    ({"services": {"grpcPort": 70000}}, "grpcPort"),
    ({"gpuGroup": []}, "gpuGroup"),
])
def test_bad_values_are_refused_with_the_field_named(bad, field):
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError) as err:
        chart.render(bad, name="aoi", namespace="inspection")
    assert field in str(err.value), str(err.value)
