"""The Helm chart, offline: strict lint, renders with minimal, two-factory and every-option values, every core and
networking object valid for Kubernetes, the RayService valid for KubeRay's CRD (no unknown fields), serveConfigV2 ==
`expertmesh config` (plus the TLS keys when Serve terminates HTTPS), the dashboard and tokens as the code expects them,
the security controls (securityContext, limits, Ray token auth, NetworkPolicy ports) on every container and pod,
Secrets byte-identical across renders, and bad or missing values refused with the value named."""

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


RAY_TOKEN = "r" * 40
FACTORY_TOKENS = {"factory-a": "a" * 32 + "-tok", "factory-b": "b" * 32 + "-tok"}
# the least a user must give: the tokens (the chart makes nothing random, so every render is the same)
MINIMAL = {"rayAuth": {"token": RAY_TOKEN},
           "tokens": {"entries": [{"factory": f, "token": t} for f, t in FACTORY_TOKENS.items()]}}
# every option on: Serve's HTTPS, TLS Ingresses, GCS fault tolerance, existing Secrets, narrowed NetworkPolicy peers
ALL_OPTIONS = {
    "rayAuth": {"existingSecret": "ray-auth"},
    "tokens": {"existingSecret": "factory-tokens"},
    "tls": {"http": {"enabled": True, "secretName": "expertmesh-http-tls"},
            "ingress": {"enabled": True, "className": "nginx", "secretName": "stations-tls",
                        "grpc": {"host": "grpc.aoi.example"},
                        "http": {"host": "aoi.example",
                                 "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"}}}},
    "gcsFaultTolerance": {"enabled": True, "redisAddress": "redis-master.redis:6379",
                          "redisPassword": {"existingSecret": "redis-auth", "key": "redis-password"}},
    "networkPolicy": {"stations": {"from": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
                      "operator": {"from": [{"namespaceSelector": {"matchLabels": {
                          "kubernetes.io/metadata.name": "ray-system"}}}], "extraPorts": [6379]}},
}


def two_factories() -> dict:
    return yaml.safe_load((CHART / "examples" / "two-factories.yaml").read_text())


def render_text(values: dict | None = None) -> dict[str, str]:
    return helm.Chart.load(str(CHART)).render(values, name="aoi", namespace="inspection", is_install=True)


def render(values: dict | None = None) -> list[dict]:
    out = render_text(MINIMAL if values is None else values)
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


VALUE_SETS = [MINIMAL, two_factories(), ALL_OPTIONS, {**MINIMAL, "networkPolicy": {"enabled": False}},
              {**MINIMAL, "rayAuth": {"mode": "disabled"}, "autoscaling": {"enabled": False}}]
VALUE_IDS = ["minimal", "two-factories", "all-options", "no-network-policy", "no-ray-auth"]


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_the_chart_lints_strictly(values):
    report = helm.lint(str(CHART), values, strict=True, namespace="inspection", kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("values, expected", [
    (MINIMAL, ["ConfigMap", "NetworkPolicy", "RayService", "Secret", "Secret", "Service", "Service", "Service"]),
    (two_factories(), ["ConfigMap", "NetworkPolicy", "PodMonitor", "RayService", "Service", "Service", "Service"]),
    (ALL_OPTIONS, ["ConfigMap", "Ingress", "Ingress", "NetworkPolicy", "RayService", "Service", "Service", "Service"]),
    (VALUE_SETS[3], ["ConfigMap", "RayService", "Secret", "Secret", "Service", "Service", "Service"]),
    (VALUE_SETS[4], ["ConfigMap", "NetworkPolicy", "RayService", "Secret", "Service", "Service", "Service"]),
], ids=VALUE_IDS)
def test_every_rendered_object_validates(values, expected, crd_schema):
    import jsonschema

    docs = render(values)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == expected, kinds
    for d in docs:
        if d["apiVersion"] in ("v1", "networking.k8s.io/v1"):  # Kubernetes' own schemas, unknown fields refused
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
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    path = tmp_path / "tokens.yaml"
    path.write_text(secrets["aoi-expertmesh-tokens"]["stringData"]["tokens.yaml"])
    assert TokenTable.load(str(path)).factories_by_token == {t: f for f, t in FACTORY_TOKENS.items()}
    assert secrets["aoi-expertmesh-ray-auth"]["stringData"] == {"auth_token": RAY_TOKEN}
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["expertmesh-dashboard.json"]) == build_dashboard(), "run `make chart`"
    (rs,) = by_kind(render({**MINIMAL, "tokens": {"existingSecret": "factory-tokens", "key": "t.yaml",
                                                  "mountPath": "/etc/expertmesh/tokens"}}), "RayService")
    volumes = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "tokens", "secret": {"secretName": "factory-tokens"}} in volumes


@pytest.mark.parametrize("bad, field", [
    ({"gpuGroups": [{"name": "factory-a", "pool": "factory-a", "gpusPerPod": 0, "gpuMemoryGiB": 24}]}, "gpusPerPod"),
    ({"gpuGroups": [{"name": "factory-a", "pool": "factory-a", "gpuMemoryGiB": 24}]}, "gpusPerPod"),
    ({"gpuGroups": [{"name": "factory-a", "pool": "factory-a", "gpusPerPod": 1, "gpuMemoryGiB": 24}]}, "resources"),
    ({"head": {"resources": {"limits": None}}}, "limits"),  # null removes the default
    ({"models": {"source": "build", "mountPath": "/models", "build": {"resources": {
        "requests": {"memory": None}}}}}, "memory"),
    ({"security": {"runAsUser": 0, "runAsGroup": 100, "fsGroup": 100, "readOnlyRootFilesystem": True,
                   "seccompProfile": {"type": "RuntimeDefault"}, "writableDirs": []}}, "runAsUser"),
    ({"security": {"runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100, "readOnlyRootFilesystem": True,
                   "seccompProfile": {"type": "Unconfined"}, "writableDirs": []}}, "seccompProfile"),
    ({"tokens": {"generate": ["factory-a"], "key": "tokens.yaml", "mountPath": "/etc/t"}}, "generate"),
    ({"tokens": {"entries": [{"factory": "factory-a", "token": "short"}], "key": "tokens.yaml",
                 "mountPath": "/etc/t"}}, "token"),
    ({"rayAuth": {"mode": "token", "token": "short"}}, "token"),
    ({"image": {"repository": "", "tag": "0.1.0"}}, "repository"),
    ({"image": {"repository": None, "tag": "0.1.0"}}, "repository"),  # null removes the default
    ({"models": {"source": "pvc", "mountPath": "/models"}}, "pvc"),
    ({"services": {"grpcPort": 70000}}, "grpcPort"),
    ({"gpuGroup": []}, "gpuGroup"),
])
def test_bad_values_are_refused_with_the_field_named(bad, field):
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError) as err:
        chart.render({**MINIMAL, **bad}, name="aoi", namespace="inspection")
    assert field in str(err.value), str(err.value)


def _pods(rs: dict) -> list[tuple[str, dict]]:
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, g["template"]["spec"]) for name, g in groups]


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_every_container_runs_locked_down_with_requests_and_limits(values):
    (rs,) = by_kind(render(values), "RayService")
    pods = _pods(rs)
    assert len(pods) >= 2
    containers = []
    for name, pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000 and psc["runAsGroup"] == 100, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        assert {"tmp", "ray-home", "cache"} <= writable, name
        for c in pod["containers"] + pod.get("initContainers", []):
            containers.append((f"{name}/{c['name']}", c))
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/home/ray/.ray", "/home/ray/.cache"} <= mounts, (name, c["name"])
    scaler = rs["spec"]["rayClusterConfig"].get("autoscalerOptions")  # the sidecar KubeRay adds to the head
    if scaler is not None:
        containers.append(("autoscaler", scaler))
    if (values.get("models") or {}).get("source", "build") == "build":
        assert any(n.endswith("/build-zoo") for n, _ in containers)
    for name, c in containers:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, name
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("values, secret", [(MINIMAL, "aoi-expertmesh-ray-auth"), (ALL_OPTIONS, "ray-auth")],
                         ids=["rendered-secret", "existing-secret"])
def test_ray_token_auth_reaches_every_ray_container_and_kuberay(values, secret):
    (rs,) = by_kind(render(values), "RayService")
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": secret}
    for name, pod in _pods(rs):
        env = _env(pod["containers"][0])
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": secret, "key": "auth_token"}}, name
    (rs,) = by_kind(render(VALUE_SETS[4]), "RayService")  # rayAuth.mode: disabled
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}
    assert all("RAY_AUTH_TOKEN" not in _env(pod["containers"][0]) for _, pod in _pods(rs))


def _ports(rule: dict) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


def test_the_network_policy_opens_only_the_ports_each_peer_needs():
    (np,) = by_kind(render(), "NetworkPolicy")
    spec = np["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "expertmesh",
                                                  "app.kubernetes.io/instance": "aoi"}
    intra, stations, prometheus, operator = spec["ingress"]
    # Ray pods of this release: every port, and only from Ray pods of this release
    assert "ports" not in intra
    assert intra["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "expertmesh", "app.kubernetes.io/instance": "aoi", "ray.io/is-ray-node": "yes"}}}]
    assert _ports(stations) == {9000, 8000} and "from" not in stations  # any source, the token-checked ports only
    assert _ports(prometheus) == {8080}
    assert prometheus["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert _ports(operator) == {8265, 8000}  # dashboard (serveConfigV2, status) and the head proxy's /-/healthz
    assert operator["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    for rule in spec["ingress"][1:]:  # the dashboard, GCS and Ray client are never open to stations or Prometheus
        assert rule is operator or not _ports(rule) & {8265, 6379, 10001}
    (np,) = by_kind(render(ALL_OPTIONS), "NetworkPolicy")
    _, stations, _, operator = np["spec"]["ingress"]
    assert stations["from"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert _ports(operator) == {8265, 8000, 6379}
    assert operator["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}}}]
    assert by_kind(render(VALUE_SETS[3]), "NetworkPolicy") == []


def test_secrets_render_byte_identically_every_time():
    first, second = render_text(MINIMAL), render_text(MINIMAL)
    secret_file = next(p for p in first if p.endswith("templates/secret.yaml"))
    assert first[secret_file] == second[secret_file] and first == second
    assert "kind: Secret" in first[secret_file] and RAY_TOKEN in first[secret_file]
    # existing Secrets: the chart renders none and only refers to them
    assert by_kind(render(ALL_OPTIONS), "Secret") == []


@pytest.mark.parametrize("values, message", [
    ({"rayAuth": {"token": RAY_TOKEN}}, "tokens.existingSecret"),
    ({"tokens": MINIMAL["tokens"]}, "rayAuth.existingSecret"),
    ({**MINIMAL, "tls": {"http": {"enabled": True}}}, "tls.http.secretName"),
    ({**MINIMAL, "tls": {"ingress": {"enabled": True, "secretName": "x"}}}, "tls.ingress.grpc.host"),
    ({**MINIMAL, "tls": {"ingress": {"enabled": True, "grpc": {"host": "g.example"}}}}, "tls.ingress.secretName"),
    ({**MINIMAL, "gcsFaultTolerance": {"enabled": True}}, "gcsFaultTolerance.redisAddress"),
    ({**MINIMAL, "gcsFaultTolerance": {"enabled": True, "redisAddress": "r:6379"}},
     "gcsFaultTolerance.redisPassword.existingSecret"),
], ids=["no-station-tokens", "no-ray-token", "tls-http-no-cert", "ingress-no-host", "ingress-no-cert",
        "gcs-ft-no-redis", "gcs-ft-no-password"])
def test_a_missing_required_value_fails_naming_it(values, message):
    with pytest.raises(helm.HelmError) as err:
        render_text(values)
    assert message in str(err.value), str(err.value)
    if message.startswith(("tokens.", "rayAuth.")):
        assert "GitOps" in str(err.value)
    with pytest.raises(helm.HelmError):  # the defaults alone give no tokens: `helm install` with none fails too
        render_text(None)


def test_gcs_fault_tolerance_uses_kubes_redis_options():
    (rs,) = by_kind(render(ALL_OPTIONS), "RayService")
    assert rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis-master.redis:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "redis-password"}}}}
    (rs,) = by_kind(render(), "RayService")
    assert "gcsFaultToleranceOptions" not in rs["spec"]["rayClusterConfig"]
    assert "ray.io/ft-enabled" not in (rs["metadata"].get("annotations") or {})


def test_tls_serve_terminates_https_and_an_ingress_terminates_grpc():
    docs = render(ALL_OPTIONS)
    (rs,) = by_kind(docs, "RayService")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    expected = yaml.safe_load((CHART / "files" / "serve-config.yaml").read_text())
    expected["http_options"].update(ssl_keyfile="/etc/expertmesh/tls/tls.key",
                                    ssl_certfile="/etc/expertmesh/tls/tls.crt")
    assert config == expected  # the bundle with only Serve's HTTPS keys added
    from ray.serve.schema import ServeDeploySchema
    assert ServeDeploySchema.model_validate(config).http_options.ssl_certfile == "/etc/expertmesh/tls/tls.crt"
    # KubeRay checks the head's proxy over plain HTTP: the head takes no station traffic; workers get an HTTPS probe
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is True
    for name, pod in _pods(rs):
        c = pod["containers"][0]
        assert {"name": "http-tls", "mountPath": "/etc/expertmesh/tls", "readOnly": True} in c["volumeMounts"]
        assert {"name": "http-tls", "secret": {"secretName": "expertmesh-http-tls"}} in pod["volumes"]
        if name != "head":
            assert "https://localhost:8000/-/healthz" in c["readinessProbe"]["exec"]["command"][-1], name
    ingresses = {i["metadata"]["name"]: i["spec"] for i in by_kind(docs, "Ingress")}
    grpc, http = ingresses["aoi-expertmesh-grpc"], ingresses["aoi-expertmesh-http"]
    assert grpc["tls"] == [{"hosts": ["grpc.aoi.example"], "secretName": "stations-tls"}]
    assert grpc["rules"][0]["http"]["paths"][0]["backend"]["service"] == {"name": "aoi-expertmesh-grpc",
                                                                         "port": {"number": 9000}}
    assert http["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {"number": 8000}
    # TLS off (the default): the Serve config is the bundle byte for byte, no probe override, no Ingress
    (rs,) = by_kind(render(), "RayService")
    assert rs["spec"]["serveConfigV2"].strip() == (CHART / "files" / "serve-config.yaml").read_text().strip()
    assert "excludeHeadPodFromServeSvc" not in rs["spec"]
    assert all("readinessProbe" not in pod["containers"][0] for _, pod in _pods(rs))
