"""Two CoEs on the shared Serve instance: a request names its CoE or gets its factory's, the tokens file says which a
factory may use, a checkpoint both use is held once, and the metrics carry the CoE."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import pytest
import yaml
from ray import serve

from expertmesh.cluster import rollout, rollout_store
from expertmesh.deployments import runner
from expertmesh.deployments.config import APP_NAME, HOST_DEPLOYMENT, AppArgs
from expertmesh.experts.images import encode_png
from expertmesh.experts.pcb_aoi import generator
from expertmesh.rollout_command import apply
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


def test_another_coe_is_changed_live_with_no_failed_request(serving, two_coes):
    """`expertmesh rollout --coe pcb-lite`: pcb-lite's own live change (update, canary for half of factory-b,
    rollback twice) while requests of both CoEs keep coming: none fails, each is answered by the revision its CoE's
    state names, and pcb-aoi never moves."""
    v2 = two_coes.parent / "pcb-lite-v2.yaml"
    data = lite_spec_data(own_expert=True)  # revision 2: QFPs also get lite_solder, an expert of pcb-lite's own
    data["version"] = 2
    v2.write_text(yaml.safe_dump(data, sort_keys=False))
    answers: list[tuple[str, str]] = []  # (the CoE asked for, the revision that answered, or the error code)
    stop = threading.Event()

    def load(factory: str, coe: str) -> None:
        while not stop.is_set():
            try:
                answers.append((coe, inspect(serving, factory, coe=coe, part="qfp").coe_version))
            except grpc.RpcError as exc:
                answers.append((coe, exc.code().name))

    def answered(coe: str, n: int = 4) -> Counter:
        """The revisions that answered `coe`'s next n requests."""
        return Counter(inspect(serving, "factory-b", coe=coe, part="qfp").coe_version for _ in range(n))

    threads = [threading.Thread(target=load, args=("factory-b", c)) for c in ("pcb-lite", "pcb-aoi")]
    for t in threads:
        t.start()
    try:
        apply(serving.app_args, rollout.update(rollout_store.read("pcb-lite"), str(v2)), coe="pcb-lite")
        assert answered("pcb-lite") == {"pcb-lite@2": 4} and answered("pcb-aoi") == {"pcb-aoi@1": 4}
        r = inspect(serving, "factory-b", part="qfp")  # factory-b's default is pcb-lite: now revision 2
        assert r.coe_version == "pcb-lite@2" and "lite_solder" in {t.expert for t in r.experts}, r.experts
        apply(serving.app_args, rollout.rollback(rollout_store.read("pcb-lite")), coe="pcb-lite")
        assert answered("pcb-lite") == {"pcb-lite@1": 4}
        apply(serving.app_args, rollout.start_canary(rollout_store.read("pcb-lite"), str(v2), "factory-b", 0.5),
              coe="pcb-lite")
        since = len(answers)
        seen = answered("pcb-lite", 6)  # with the load's: an exact half of factory-b's pcb-lite requests
        assert set(seen) | {v for c, v in answers[since:] if c == "pcb-lite"} == {"pcb-lite@1", "pcb-lite@2"}
        assert rollout_store.read().revision == 0  # pcb-aoi's own state never moved
        apply(serving.app_args, rollout.rollback(rollout_store.read("pcb-lite")), coe="pcb-lite")
        assert answered("pcb-lite") == {"pcb-lite@1": 4}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        rollout_store.clear()
        runner.redeploy(rollout_store_app_args())
    codes = Counter(code for _, code in answers)
    assert len(answers) >= 10 and set(codes) <= {"pcb-lite@1", "pcb-lite@2", "pcb-aoi@1"}, codes


def rollout_store_app_args():
    """The app's build arguments as last stored (the fixture's, with pcb-lite)."""
    return AppArgs.model_validate(rollout_store.read_app_args())
