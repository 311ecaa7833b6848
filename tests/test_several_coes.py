"""Two CoEs on the shared Serve instance: a request names its CoE or gets its factory's, the tokens file says which a
factory may use, a checkpoint both use is held once, and the metrics carry the CoE."""

from __future__ import annotations

import time

import grpc
import pytest
import yaml
from ray import serve

from expertmesh.deployments import runner
from expertmesh.deployments.config import APP_NAME, HOST_DEPLOYMENT
from expertmesh.experts.images import encode_png
from expertmesh.experts.pcb_aoi import generator
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc
from conftest import lite_spec_data
from serving_fixture import metric_total

pytestmark = pytest.mark.integration


def lite_spec(path) -> None:
    """`pcb-lite` (conftest.lite_spec_data): general_defect's checkpoint under another name, which must be shared."""
    path.write_text(yaml.safe_dump(lite_spec_data(), sort_keys=False))


@pytest.fixture(scope="module")
def two_coes(serving, tmp_path_factory):
    path = tmp_path_factory.mktemp("coes") / "pcb-lite.yaml"
    lite_spec(path)
    tokens_before = serving.tokens_file.read_text()
    runner.redeploy(serving.app_args.model_copy(update={"coes": [str(path)]}))
    serving.tokens_file.write_text(yaml.safe_dump({
        "tokens": {t: f for f, t in serving.tokens.items()},
        "coes": {"default": {"allow": ["pcb-aoi"]}, "factory-b": {"allow": ["pcb-aoi", "pcb-lite"], "use": "pcb-lite"}},
    }))
    time.sleep(2.5)  # the ingress reads the tokens file again at most every 2 s
    yield path
    serving.tokens_file.write_text(tokens_before)
    runner.redeploy(serving.app_args)
    time.sleep(2.5)


def inspect(serving, factory: str, coe: str = "", part: str = "chip_resistor"):
    image = encode_png(generator.generate(part, "ok", 5, 0))
    with grpc.insecure_channel(serving.grpc_target) as ch:
        return pb_grpc.InspectionServiceStub(ch).Inspect(
            pb.InspectRequest(factory_id=factory, image=image, coe=coe), timeout=30,
            metadata=(("authorization", f"Bearer {serving.tokens[factory]}"),))


def test_a_request_gets_its_factorys_coe_or_the_one_it_names(serving, two_coes):
    r = inspect(serving, "factory-b")  # factory-b's default: pcb-lite
    assert r.coe_version == "pcb-lite@1"
    assert [t.expert for t in r.experts] == ["component_classifier", "lite_inspector"], r.experts
    assert all(t.version for t in r.experts)
    r = inspect(serving, "factory-b", coe="pcb-aoi")
    assert r.coe_version == "pcb-aoi@1" and "chip_defect" in {t.expert for t in r.experts}
    assert inspect(serving, "factory-a").coe_version == "pcb-aoi@1"  # the default's default: the app's first CoE


@pytest.mark.parametrize("factory, coe, code, words", [
    ("factory-a", "pcb-lite", grpc.StatusCode.PERMISSION_DENIED, "may not use CoE 'pcb-lite'"),
    ("factory-b", "nope", grpc.StatusCode.NOT_FOUND, "no CoE named 'nope'"),
])
def test_a_coe_the_factory_may_not_use_or_not_served_is_refused_naming_the_field(serving, two_coes, factory, coe,
                                                                                  code, words):
    with pytest.raises(grpc.RpcError) as e:
        inspect(serving, factory, coe=coe)
    assert e.value.code() == code and words in e.value.details() and "coe" in e.value.details()


def test_a_checkpoint_both_coes_use_is_held_once_and_metrics_carry_the_coe(serving, two_coes):
    inspect(serving, "factory-b", part="qfp")
    known = serve.get_deployment_handle(HOST_DEPLOYMENT, app_name=APP_NAME).info.remote().result()["known"]
    assert "general_defect" in known and not any("lite_inspector" in k or "@" in k for k in known), known
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if metric_total(serving.metrics_url, "ray_expertmesh_requests_total", coe="pcb-lite", code="OK") > 0:
            break
        time.sleep(1)
    assert metric_total(serving.metrics_url, "ray_expertmesh_requests_total", coe="pcb-lite", code="OK") > 0
    assert metric_total(serving.metrics_url, "ray_expertmesh_router_decisions_total", coe="pcb-lite") > 0
