"""The serving path end to end: real Ray Serve, real gRPC and HTTP over loopback, the tiny zoo."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import grpc
import pytest

from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.preprocess import encode_png
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def png(component="led", defect="ok", i=0) -> bytes:
    return encode_png(generator.generate(component, defect, 123, i))


@pytest.fixture(scope="module")
def stub(serving):
    with grpc.insecure_channel(serving.grpc_target) as ch:
        yield pb_grpc.InspectionServiceStub(ch)


def auth(serving, factory="factory-a"):
    return (("authorization", f"Bearer {serving.tokens[factory]}"),)


def test_inspect_returns_a_traced_verdict(serving, stub):
    resp = stub.Inspect(pb.InspectRequest(request_id="r1", factory_id="factory-a", image=png()), metadata=auth(serving))
    assert resp.request_id == "r1" and resp.verdict in (pb.PASS, pb.DEFECT, pb.UNCERTAIN)
    assert resp.experts[0].expert == "component_classifier" and resp.experts[0].reason == "router"
    assert len(resp.experts) >= 2 and all(t.node_id and t.replica_id and t.latency_ms > 0 for t in resp.experts)
    assert resp.latency_ms > 0


def test_rule_forces_category_and_trace_says_why(serving, stub):
    resp = stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png("qfp"), component_hint="qfp",
                                          station_id="wave-1"), metadata=auth(serving))
    assert resp.category == "qfp" and len(resp.request_id) == 32  # generated id
    by_expert = {t.expert: t for t in resp.experts}
    assert by_expert["qfp_defect"].reason == "rule" and by_expert["qfp_defect"].because_of == "cad_qfp"
    assert by_expert["solder_fine"].reason in ("rule", "dependency")


@pytest.mark.parametrize("metadata, code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer not-a-real-token-at-all"),), grpc.StatusCode.UNAUTHENTICATED),
])
def test_auth_errors(serving, stub, metadata, code):
    with pytest.raises(grpc.RpcError) as info:
        stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png()), metadata=metadata)
    assert info.value.code() == code


def test_token_of_another_factory_is_denied(serving, stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Inspect(pb.InspectRequest(factory_id="factory-b", image=png()), metadata=auth(serving, "factory-a"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "factory_id" in info.value.details()


@pytest.mark.parametrize("request_kwargs, fragment", [
    (dict(factory_id="factory-a", image=b""), "image: image is empty"),
    (dict(factory_id="factory-a", image=b"not an image"), "could not be decoded"),
    (dict(factory_id="factory-a", image=b"\x89PNG" + b"0" * (5 * 1024 * 1024)), "over the limit"),
    (dict(factory_id="", image=png()), "factory_id: factory_id is missing"),
])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(serving, stub, request_kwargs, fragment):
    with pytest.raises(grpc.RpcError) as info:
        stub.Inspect(pb.InspectRequest(**request_kwargs), metadata=auth(serving))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()
    assert "Traceback" not in info.value.details()
    assert stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png()), metadata=auth(serving)).experts


def test_inspect_board_streams_one_result_per_component(serving, stub):
    comps = [pb.InspectRequest(image=png(c, "ok", i)) for i, c in enumerate(generator.COMPONENTS)]
    out = list(stub.InspectBoard(pb.InspectBoardRequest(board_id="b1", factory_id="factory-a", components=comps),
                                 metadata=auth(serving)))
    assert sorted(r.component_index for r in out) == list(range(len(comps)))
    assert all(r.board_id == "b1" and r.request_id == f"b1-{r.component_index}" for r in out)


def http_post(serving, body: dict, token: str | None):
    req = urllib.request.Request(serving.http_url + "/v1/inspect", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_ingress(serving):
    token = serving.tokens["factory-a"]
    body = {"factory_id": "factory-a", "image": base64.b64encode(png("diode")).decode()}
    status, doc = http_post(serving, body, token)
    assert status == 200 and doc["verdict"] in ("PASS", "DEFECT", "UNCERTAIN") and doc["experts"][0]["reason"] == "router"
    assert http_post(serving, body, None)[0] == 401
    assert http_post(serving, {**body, "factory_id": "factory-b"}, token)[0] == 403
    status, doc = http_post(serving, {**body, "image": "%%%"}, token)
    assert status == 400 and doc["error"]["field"] == "image"
    big = base64.b64encode(b"\x89PNG" + b"0" * (5 * 1024 * 1024)).decode()
    assert http_post(serving, {**body, "image": big}, token)[0] == 413


def test_client_from_reflection_alone(serving):
    """A generic client that has none of our stubs: it learns the service from server reflection."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(serving.grpc_target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "expertmesh.v1.InspectionService" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("expertmesh.v1.InspectionService").FindMethodByName("Inspect")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = ch.unary_unary("/expertmesh.v1.InspectionService/Inspect", request_serializer=request_cls.SerializeToString,
                              response_deserializer=response_cls.FromString)
        resp = call(request_cls(factory_id="factory-a", image=png("sot23")), metadata=auth(serving), timeout=30)
    assert resp.DESCRIPTOR.full_name == "expertmesh.v1.InspectResponse"
    assert resp.category and resp.experts[0].expert == "component_classifier"


def test_health_check_a_standard_client_can_call(serving):
    """Serve's proxy health check, by its reflected method path, with no stubs."""
    with grpc.insecure_channel(serving.grpc_target) as ch:
        healthz = ch.unary_unary("/ray.serve.RayServeAPIService/Healthz", request_serializer=lambda _: b"",
                                 response_deserializer=lambda b: b)
        assert b"success" in healthz(None, timeout=10)


def test_every_component_type_reaches_its_experts(serving, stub, default_spec):
    for comp in generator.COMPONENTS:
        resp = stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png(comp, "ok", 1)), metadata=auth(serving))
        assert resp.category == comp
        table = [t for t in resp.experts if t.reason == "table"]
        assert [t.expert for t in table] == default_spec.category(comp).experts, comp


def test_polarized_parts_trigger_the_shared_polarity_expert(serving, stub, default_spec):
    upstream = {"soic": "soic_defect", "electrolytic_capacitor": "electrolytic_defect", "diode": "diode_defect", "led": "diode_defect"}
    for comp, up in upstream.items():
        for defect, verdict in (("ok", pb.PASS), ("reversed_polarity", pb.DEFECT)):
            resp = stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png(comp, defect, 2)), metadata=auth(serving))
            pol = [t for t in resp.experts if t.expert == "polarity"]
            assert len(pol) == 1 and pol[0].reason == "dependency" and pol[0].because_of == up, (comp, defect)
            assert resp.verdict == verdict, (comp, defect, resp.defect)
    resp = stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png("chip_resistor", "ok", 2)), metadata=auth(serving))
    assert "polarity" not in {t.expert for t in resp.experts}


def test_verdict_accuracy_on_a_generated_sample(serving, stub):
    """Every (component, defect) pair, 3 images each (147), streamed through InspectBoard: >= 95% right."""
    pairs = [(c, d, i) for c, d in generator.all_pairs() for i in range(3)]
    correct = 0
    for start in range(0, len(pairs), 21):
        chunk = pairs[start:start + 21]
        req = pb.InspectBoardRequest(board_id=f"acc-{start}", factory_id="factory-a",
                                     components=[pb.InspectRequest(image=png(c, d, 1000 + i)) for c, d, i in chunk])
        for r in stub.InspectBoard(req, metadata=auth(serving), timeout=120):
            truth = chunk[r.component_index][1]
            correct += (r.verdict == pb.PASS) == (truth == "ok") and r.verdict != pb.UNCERTAIN
    assert correct / len(pairs) >= 0.95, f"verdict accuracy {correct / len(pairs):.3f}"


def test_queue_full_is_resource_exhausted_and_nothing_is_dropped(serving, stub):
    """A flood past the ingress's ongoing + queued limits: every request ends in a result or RESOURCE_EXHAUSTED."""
    from concurrent.futures import ThreadPoolExecutor

    board = pb.InspectBoardRequest(factory_id="factory-a", components=[pb.InspectRequest(image=png("qfp", "ok", k)) for k in range(4)])

    def one(_):
        try:
            return len(list(stub.InspectBoard(board, metadata=auth(serving), timeout=120)))
        except grpc.RpcError as err:
            return err.code()

    with ThreadPoolExecutor(max_workers=40) as ex:
        outcomes = list(ex.map(one, range(40)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes
    assert set(outcomes) <= {4, grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes  # full answers or backpressure only
    assert stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png()), metadata=auth(serving)).experts


def test_http_flood_gets_503_and_nothing_is_dropped(serving):
    """HTTP past the ingress's limits: Serve's proxy answers 503 (its backpressure code); the rest are full answers."""
    from concurrent.futures import ThreadPoolExecutor

    body = json.dumps({"factory_id": "factory-a", "image": base64.b64encode(png("qfp")).decode()}).encode()

    def one(_):
        req = urllib.request.Request(serving.http_url + "/v1/inspect", data=body, method="POST", headers={
            "content-type": "application/json", "authorization": f"Bearer {serving.tokens['factory-a']}"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status if json.loads(r.read())["experts"] else -1
        except urllib.error.HTTPError as e:
            return e.code

    with ThreadPoolExecutor(max_workers=48) as ex:
        statuses = list(ex.map(one, range(144)))
    assert 503 in statuses and set(statuses) <= {200, 503}, sorted(set(statuses))
    assert http_post(serving, {"factory_id": "factory-a", "image": base64.b64encode(png()).decode()},
                     serving.tokens["factory-a"])[0] == 200


def test_a_failing_expert_ends_the_request_with_a_clear_error(serving, stub):
    """Kill every replica of an expert: requests needing it end in a result or UNAVAILABLE, never hang."""
    import ray

    victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#qfp_defect#" in a["name"]]
    assert victims
    for a in victims:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
    outcomes = []
    for i in range(5):
        try:
            r = stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png("qfp", "ok", i), component_hint="qfp"),
                             metadata=auth(serving), timeout=90)
            outcomes.append("ok" if r.experts else "empty")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "qfp_defect" in err.details(), err.details()
            assert "Traceback" not in err.details()
            outcomes.append(err.code().name)
    assert "empty" not in outcomes
    # Serve replaces the replica: the expert answers again
    import time
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            r = stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png("qfp"), component_hint="qfp"),
                             metadata=auth(serving), timeout=30)
            if any(t.expert == "qfp_defect" for t in r.experts):
                break
        except grpc.RpcError:
            time.sleep(1)
    else:
        pytest.fail("qfp_defect never came back")
