"""Serve config (pure) and per-factory tokens (pure): no Ray started."""

from __future__ import annotations

import json

import os

import pytest
import yaml
from pydantic import ValidationError

from expertmesh.cli import main
from expertmesh.deployments.auth import TokenTable, write_dev_tokens
from expertmesh.deployments.config import AppArgs, ServeSettings, build_serve_config, deployment_options
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
    assert set(by_name) == {e.name for e in default_spec.experts} | {"Router", "Ingress"}
    chip = by_name["chip_defect"]
    assert chip["user_config"]["max_batch_size"] == default_spec.expert("chip_defect").max_batch
    assert chip["autoscaling_config"]["max_replicas"] == 2 and chip["ray_actor_options"]["num_cpus"] == 0.25


def test_options_from_one_place(default_spec):
    settings = ServeSettings(expert_num_gpus=0.5)
    opts = deployment_options(default_spec, settings)
    args = AppArgs(zoo="/z", tokens_file="/t", settings=settings)
    assert build_serve_config(default_spec, args)["applications"][0]["deployments"] == list(opts.values())
    assert opts["polarity"]["ray_actor_options"]["num_gpus"] == 0.5  # device: auto gets the fractional GPU


def test_autoscaling_allows_zero_min(default_spec):
    e = default_spec.expert("general_defect").model_copy(
        update={"autoscaling": default_spec.expert("general_defect").autoscaling.model_copy(update={"min_replicas": 0})})
    from expertmesh.deployments.config import expert_options
    a = expert_options(e, ServeSettings())["autoscaling_config"]
    assert a["min_replicas"] == 0 and a["initial_replicas"] == 1


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
    assert by_name["chip_defect"]["ray_actor_options"]["label_selector"] == {"expertmesh.io/node": "node-1"}
    solder = by_name["solder_fine"]  # on 3 of the 4 planned nodes: kept off the fourth, one replica per node at least
    assert solder["ray_actor_options"]["label_selector"] == {"expertmesh.io/node": "!in(node-3)"}
    assert solder["autoscaling_config"]["min_replicas"] == 3
    assert by_name["polarity"]["ray_actor_options"]["label_selector"] == {"expertmesh.io/node": "!in(node-2,node-3)"}
    assert "label_selector" not in by_name["sot23_defect"]["ray_actor_options"]  # not in the plan: anywhere
    assert solder["max_replicas_per_node"] == 1 and solder["max_surge_percent"] == 0  # one per node, no surge
    assert by_name["chip_defect"]["max_surge_percent"] == 100  # replacements start before old ones stop
    assert doc["applications"][0]["args"]["placement"]["chip_defect"] == ["node-1"]
    plan.write_text(json.dumps({"replicas": {"ghost": ["node-0"]}}))
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out), "--plan", str(plan)]) == 2
    plan.write_text("{}")
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out), "--plan", str(plan)]) == 2


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
        opts["chip_defect"]["max_ongoing_requests"] = -1  # ServeDeploySchema: must be greater than 0
        return opts

    monkeypatch.setattr(config, "app_options", one_invalid)
    out = tmp_path / "serve.yaml"
    assert main(["config", "--zoo", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "deployments[chip_defect].max_ongoing_requests" in err and "Traceback" not in err, err
    assert not out.exists()
