"""Serve config (pure) and per-factory tokens (pure): no Ray started."""

from __future__ import annotations

import json

import os

import pytest
import yaml
from pydantic import ValidationError

from expertmesh.cli import main
from expertmesh.deployments.auth import TokenTable, write_dev_tokens
from expertmesh.cluster.rollout import RolloutState
from expertmesh.deployments.config import AppArgs, ServeSettings, deployment_options
from expertmesh.deployments.served import build_serve_config, with_rollout
from expertmesh.errors import InvalidArgument, PermissionDenied, Unauthenticated


def test_config_file_is_what_serve_deploy_accepts(default_spec, tmp_path, capsys):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out), "--grpc-port", "9100"]) == 0
    doc = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    assert app["import_path"] == "expertmesh.deployments.app:build_app"
    assert doc["grpc_options"]["port"] == 9100 and doc["grpc_options"]["enable_reflection"] is True
    by_name = {d["name"]: d for d in app["deployments"]}
    assert set(by_name) == {"Host", "Router", "Ingress"}  # one expert host holds every expert; the router classifies
    host = by_name["Host"]
    assert host["user_config"]["experts"] == sorted(e.name for e in default_spec.experts
                                                    if e.name != default_spec.router.expert)
    assert host["user_config"]["max_batch"]["chip_defect"] == default_spec.expert("chip_defect").max_batch
    assert host["autoscaling_config"]["max_replicas"] == 2 and host["ray_actor_options"]["num_cpus"] == 1.0
    assert all(d["logging_config"] == {"enable_access_log": False} for d in app["deployments"])
    assert doc["logging_config"] == {"enable_access_log": False}


def test_options_from_one_place(default_spec):
    settings = ServeSettings(expert_num_gpus=0.5)
    opts = deployment_options(default_spec, settings)
    args = AppArgs(zoo="/z", tokens_file="/t", settings=settings)
    served = with_rollout(opts, RolloutState(), [], {})  # no live change, no other CoE: what the app build adds
    assert build_serve_config(default_spec, args)["applications"][0]["deployments"] == list(served.values())
    assert opts["Host"]["ray_actor_options"]["num_gpus"] == 0.5  # experts with device auto: the host gets the GPU share
    assert deployment_options(default_spec, ServeSettings())["Host"]["ray_actor_options"]["num_gpus"] == 0


def test_host_replicas_are_bounded_as_configured():
    with pytest.raises(ValidationError, match="raise host_max_replicas"):
        ServeSettings(host_replicas=3, host_max_replicas=2)


def test_settings_validation_names_the_fix():
    with pytest.raises(ValidationError, match="give them different ports"):
        ServeSettings(http_port=9000, grpc_port=9000)


def test_tokens(tmp_path):
    tokens = write_dev_tokens(tmp_path / "t.yaml", ["factory-a", "factory-b"])
    assert oct(os.stat(tmp_path / "t.yaml").st_mode & 0o777) == "0o600"
    table = TokenTable.load(tmp_path / "t.yaml")
    assert table.factories == {"factory-a", "factory-b"}
    assert table.authorize(f"Bearer {tokens['factory-a']}", "factory-a") == "factory-a"
    with pytest.raises(Unauthenticated, match="no bearer token"):
        table.authorize(None, "factory-a")
    with pytest.raises(Unauthenticated, match="not a bearer"):
        table.authorize(f"Basic {tokens['factory-a']}", "factory-a")
    with pytest.raises(Unauthenticated, match="unknown token"):
        table.authorize("Bearer nope", "factory-a")
    with pytest.raises(PermissionDenied) as info:
        table.authorize(f"Bearer {tokens['factory-a']}", "factory-b")
    assert info.value.field == "factory_id"


@pytest.mark.parametrize("text, fragment", [
    ("", "holds no"),
    ("short: factory-a\n", r"16\+ characters"),
    ("[unclosed", "not valid YAML"),
])
def test_bad_tokens_files(tmp_path, text, fragment):
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(InvalidArgument, match=fragment):
        TokenTable.load(tmp_path / "t.yaml")
    with pytest.raises(InvalidArgument, match="cannot read"):
        TokenTable.load(tmp_path / "absent.yaml")


def test_a_plan_pins_replicas_to_nodes_in_a_valid_config(default_spec, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"replicas": {"chip_defect": ["node-1"], "solder_fine": ["node-0", "node-1", "node-2"],
                                             "polarity": ["node-0", "node-1"], "diode_defect": ["node-3"]}}))
    out = tmp_path / "serve.yaml"
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out), "--plan", str(plan)]) == 0
    doc = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(doc)
    by_name = {d["name"]: d for d in doc["applications"][0]["deployments"]}
    assert set(by_name) == {"Host-node-0", "Host-node-1", "Host-node-2", "Host-node-3", "Router", "Ingress"}
    for node in ("node-0", "node-1", "node-2", "node-3"):  # one expert host pinned to every planned node
        assert by_name[f"Host-{node}"]["ray_actor_options"]["label_selector"] == {"expertmesh.io/node": node}
    held = {d: by_name[d]["user_config"]["experts"] for d in by_name if d.startswith("Host-")}
    assert held == {"Host-node-0": ["polarity", "solder_fine"], "Host-node-1": ["chip_defect", "polarity", "solder_fine"],
                    "Host-node-2": ["solder_fine"], "Host-node-3": ["diode_defect"]}, held
    homes = by_name["Router"]["user_config"]["homes"]  # each expert's calls go to its first planned node
    assert homes == {"chip_defect": "node-1", "diode_defect": "node-3", "polarity": "node-0", "solder_fine": "node-0"}
    assert by_name["Router"]["user_config"]["host_nodes"] == ["node-0", "node-1", "node-2", "node-3"]
    assert by_name["Router"]["ray_actor_options"]["resources"] == {"node:__internal_head__": 0.001}  # front on head
    assert doc["applications"][0]["args"]["placement"]["chip_defect"] == ["node-1"]
    plan.write_text(json.dumps({"replicas": {"ghost": ["node-0"]}}))
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out), "--plan", str(plan)]) == 2
    plan.write_text("{}")
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out), "--plan", str(plan)]) == 2


def test_with_the_in_cluster_controller_the_config_lists_only_what_no_placement_changes(tmp_path):
    """KubeRay re-submits the config; Serve applies its deployment options over the app built with the stored
    placement. So the config names no `Host` (a placement replaces it by `Host-<node>`: Serve would refuse the
    config) and no router user_config (it would reset the routing); it runs the `Placement` controller on the head."""
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out), "--placement-controller"]) == 0
    doc = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    by_name = {d["name"]: d for d in app["deployments"]}
    assert set(by_name) == {"Router", "Ingress", "Placement"}
    assert "user_config" not in by_name["Router"]
    assert by_name["Placement"]["num_replicas"] == 1
    assert by_name["Placement"]["ray_actor_options"]["resources"] == {"node:__internal_head__": 0.001}
    assert app["args"]["settings"]["placement_controller"] is True and app["args"]["placement_revision"] == 0
    # without it the hosts' options are listed as before
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out)]) == 0
    names = {d["name"] for d in yaml.safe_load(out.read_text())["applications"][0]["deployments"]}
    assert names == {"Host", "Router", "Ingress"}


@pytest.mark.parametrize("flags, named", [(["--expert-num-gpus", "-1"], "--expert-num-gpus"),
                                          (["--device-idle-s", "-1"], "--device-idle-s")])
def test_a_bad_serve_option_names_its_flag(tmp_path, capsys, flags, named):
    assert main(["config", "--zoo", str(tmp_path), "--out", str(tmp_path / "s.yaml"), *flags]) == 2
    assert f"error: {named}:" in capsys.readouterr().err


def test_config_refuses_to_write_what_serve_deploy_would_reject(tmp_path, capsys, monkeypatch):
    """README: `expertmesh config` writes a Serve config validated against Ray's own ServeDeploySchema. A document
    Serve would reject (here one deployment's options made invalid) is an error naming the field, and nothing is
    written."""
    import expertmesh.deployments.config as config

    real = config.app_options

    def one_invalid(*args, **kwargs):
        opts = real(*args, **kwargs)
        opts["Host"]["max_ongoing_requests"] = -1  # ServeDeploySchema: must be greater than 0
        return opts

    monkeypatch.setattr(config, "app_options", one_invalid)
    out = tmp_path / "serve.yaml"
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "deployments[Host].max_ongoing_requests" in err and "Traceback" not in err, err
    assert not out.exists()
