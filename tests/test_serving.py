"""The serving path end to end: real Ray Serve, real gRPC and HTTP over loopback, the tiny zoo."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import ray

from expertmesh.experts.offline import load_runtime, run_coe
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.images import encode_png
from expertmesh.router.plan import aggregate
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


def http_call(serving, method: str, path: str, token: str | None, data: bytes | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of one request as a client sends it."""
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(serving.http_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def http_post(serving, body: dict, token: str | None):
    return http_call(serving, "POST", "/v1/inspect", token, json.dumps(body).encode())


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


def test_a_grpc_message_over_the_limit_is_refused_before_it_reaches_the_app(serving):
    """Serve's proxy takes gRPC messages up to settings.grpc_max_message_mib (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE in its
    process): a larger one gets RESOURCE_EXHAUSTED from gRPC itself, and the server goes on serving."""
    from serving_fixture import GRPC_MAX_MESSAGE_MIB
    big = b"\x89PNG" + b"\0" * int((GRPC_MAX_MESSAGE_MIB + 1) * 2**20)
    with grpc.insecure_channel(serving.grpc_target) as ch:
        stub = pb_grpc.InspectionServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=big), metadata=auth(serving), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        ok = stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png("diode")), metadata=auth(serving),
                          timeout=30)
    assert ok.experts


def test_http_checks_the_token_and_the_declared_length_before_reading_the_body(serving):
    """A body is never buffered for a client without a token, nor past the limit: the answer comes while the client
    has sent only the headers of what it declared (a client that then never sends the body must not hang it)."""
    import http.client
    from urllib.parse import urlparse

    url = urlparse(serving.http_url)

    def declared_only(headers: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
        try:
            conn.putrequest("POST", "/v1/inspect")
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders(b"{")  # one byte of a body that never comes
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:  # refused by the HTTP server itself, before the app
                return resp.status, {"raw": raw.decode(errors="replace")}
        finally:
            conn.close()
    token = serving.tokens["factory-a"]
    status, doc = declared_only({"content-type": "application/json", "content-length": str(10**9)})
    assert status == 401, doc
    status, doc = declared_only({"content-type": "application/json", "content-length": str(10**9),
                                 "authorization": f"Bearer {token}"})
    assert status == 413 and doc["error"]["field"] == "image", doc
    status, doc = declared_only({"content-type": "application/json", "content-length": "lots",
                                 "authorization": f"Bearer {token}"})
    assert status == 400, doc  # by the HTTP server, or by the ingress naming content-length
    assert "raw" in doc or doc["error"]["field"] == "content-length", doc


def test_a_failed_authentication_is_counted_as_unauthenticated_not_as_the_claimed_factory(serving):
    from serving_fixture import metric_total
    before = metric_total(serving.metrics_url, "ray_expertmesh_requests_total", factory="unauthenticated")
    body = {"factory_id": "factory-a", "image": base64.b64encode(png("diode")).decode()}
    assert http_post(serving, body, "forged-token")[0] == 401
    assert http_post(serving, body, serving.tokens["factory-b"])[0] == 403  # factory-b's token claiming factory-a
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and metric_total(
            serving.metrics_url, "ray_expertmesh_requests_total", factory="unauthenticated") < before + 2:
        time.sleep(1)
    assert metric_total(serving.metrics_url, "ray_expertmesh_requests_total", factory="unauthenticated") >= before + 2


def test_hostile_json_and_ids_get_400_and_are_not_echoed(serving):
    token = serving.tokens["factory-a"]
    image = base64.b64encode(png("diode")).decode()
    deep = "[" * 100_000 + "]" * 100_000  # deeper than the parser's stack: was a 500 with a traceback
    status, doc = http_call(serving, "POST", "/v1/inspect", token, deep.encode())
    assert status == 400 and doc["error"]["field"] == "body"
    for rid in ("evil\nforged log line", "x" * 10_000):
        status, doc = http_post(serving, {"factory_id": "factory-a", "image": image, "request_id": rid}, token)
        assert status == 400 and doc["error"]["field"] == "request_id" and doc["request_id"] == "", doc
    with grpc.insecure_channel(serving.grpc_target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.InspectionServiceStub(ch).Inspect(
                pb.InspectRequest(factory_id="factory-a", request_id="a\x00b", image=png("diode")),
                metadata=auth(serving), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()


def test_a_token_added_to_the_tokens_file_works_without_a_restart(serving):
    original = serving.tokens_file.read_text()
    fresh = "rotated-token-for-factory-b-0123456789"
    body = {"factory_id": "factory-b", "image": base64.b64encode(png("diode")).decode()}
    assert http_post(serving, body, fresh)[0] == 401
    try:
        serving.tokens_file.write_text(original + f"{fresh}: factory-b\n")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (status := http_post(serving, body, fresh)[0]) != 200:
            time.sleep(0.5)
        assert status == 200
        assert http_post(serving, body, serving.tokens["factory-b"])[0] == 200  # the old ones still work
    finally:
        serving.tokens_file.write_text(original)


def test_a_factory_quota_set_in_the_tokens_file_refuses_past_it_naming_the_factory_and_spares_the_others(serving, stub):
    """Quotas beside the tokens, applied without a restart: factory-b at 1 component/s (burst 1) gets one answer
    and then RESOURCE_EXHAUSTED naming its rate, while factory-a is unaffected; a board counts all its components."""
    import yaml

    original = serving.tokens_file.read_text()
    flat = {t: f for t, f in yaml.safe_load(original).items()}
    request = pb.InspectRequest(factory_id="factory-b", image=png("diode"))
    try:
        serving.tokens_file.write_text(yaml.safe_dump({"tokens": flat, "quotas": {
            "factory-b": {"rate_per_s": 1, "burst": 1, "max_in_flight": 4}}}))
        codes: list = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and grpc.StatusCode.RESOURCE_EXHAUSTED not in codes:
            try:
                stub.Inspect(request, metadata=auth(serving, "factory-b"), timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                details = err.details()
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED and set(codes) <= {grpc.StatusCode.OK,
                                                                                   grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "factory 'factory-b' is over its rate quota of 1 components/s" in details and "retry after" in details
        board = pb.InspectBoardRequest(board_id="b", factory_id="factory-b",
                                       components=[pb.InspectRequest(image=png("led", i=i)) for i in range(5)])
        with pytest.raises(grpc.RpcError) as err:  # 5 components over a max_in_flight of 4... or its rate
            list(stub.InspectBoard(board, metadata=auth(serving, "factory-b"), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "factory 'factory-b'" in err.value.details()
        ok = stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png("diode")), metadata=auth(serving),
                          timeout=30)
        assert ok.category  # another factory is not held back
    finally:
        serving.tokens_file.write_text(original)
        time.sleep(2.5)  # the ingress reads it again within 2 s: the other tests see no quota


def test_a_deadline_the_client_sends_bounds_the_request_and_ends_deadline_exceeded(serving, stub):
    request = pb.InspectRequest(factory_id="factory-a", image=png("qfp"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Inspect(request, metadata=auth(serving) + (("x-expertmesh-timeout-seconds", "0.001"),), timeout=30)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" in err.value.details()
    for bad in ("0", "-3", "soon"):
        with pytest.raises(grpc.RpcError) as err:
            stub.Inspect(request, metadata=auth(serving) + (("x-expertmesh-timeout-seconds", bad),), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-expertmesh-timeout-seconds" in err.value.details()
    body = {"factory_id": "factory-a", "image": base64.b64encode(png("qfp")).decode()}
    req = urllib.request.Request(serving.http_url + "/v1/inspect", data=json.dumps(body).encode(), method="POST",
                                 headers={"authorization": f"Bearer {serving.tokens['factory-a']}",
                                          "x-expertmesh-timeout-seconds": "0.001"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=30)
    assert http_err.value.code == 504 and json.loads(http_err.value.read())["error"]["code"] == "DEADLINE_EXCEEDED"
    ok = stub.Inspect(request, metadata=auth(serving) + (("x-expertmesh-timeout-seconds", "30"),), timeout=30)
    assert ok.verdict in (pb.PASS, pb.DEFECT, pb.UNCERTAIN)


def test_placement_endpoint_refusals(serving):
    """GET /v1/placement: a token first (401 without one), 404 naming the setting where the app runs no controller,
    400 for another method."""
    def call(method: str, token: str | None):
        return http_call(serving, method, "/v1/placement", token)
    assert call("GET", None)[0] == 401
    assert call("GET", "not-a-token")[0] == 401
    status, doc = call("GET", serving.tokens["factory-b"])  # any factory's token
    assert status == 404 and "placement_controller" in doc["error"]["fix"]
    assert call("DELETE", serving.tokens["factory-a"])[0] == 400


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


def offline_runs(spec, zoo, images):
    """The CoE run offline on `images` (`experts.offline.run_coe`, what the accuracy report measures): per image the
    router's category and every expert's output, the expected answer of the serving path for that image."""
    runtimes = {e.name: load_runtime(spec, e, zoo) for e in spec.experts}
    return run_coe(spec, runtimes, images)


def test_verdicts_are_the_offline_coes_and_match_the_ground_truth(serving, stub, default_spec):
    """Every (component, defect) pair, 3 images each (147), streamed through InspectBoard: every component answered
    once, each with the category, expert labels and verdict the offline CoE gives that image (scores equal but for
    batching noise), and >= 95% of the verdicts right against the generator's ground truth (PASS iff "ok")."""
    pairs = [(c, d, i) for c, d in generator.all_pairs() for i in range(3)]
    images = [generator.generate(c, d, 123, 1000 + i) for c, d, i in pairs]
    expected = offline_runs(default_spec, serving.zoo, np.stack([np.asarray(im) for im in images]))
    served: dict[int, pb.InspectResponse] = {}
    for start in range(0, len(pairs), 21):
        req = pb.InspectBoardRequest(board_id=f"acc-{start}", factory_id="factory-a", components=[
            pb.InspectRequest(image=encode_png(im)) for im in images[start:start + 21]])
        out = list(stub.InspectBoard(req, metadata=auth(serving), timeout=120))
        assert sorted(r.component_index for r in out) == list(range(len(req.components))), req.board_id
        served.update((start + r.component_index, r) for r in out)
    assert sorted(served) == list(range(len(pairs)))
    correct = 0
    for k, (component, defect, _) in enumerate(pairs):
        run, resp = expected[k], served[k]
        outcome = aggregate(default_spec, run.outputs)
        want = {o.expert: (o.label, o.score) for o in run.outputs}
        got = {t.expert: (t.label, t.score) for t in resp.experts[1:]}
        assert resp.category == run.router.label and abs(resp.category_confidence - run.router.score) < 1e-3, pairs[k]
        assert {e: lbl for e, (lbl, _) in got.items()} == {e: lbl for e, (lbl, _) in want.items()}, (pairs[k], got, want)
        assert all(abs(got[e][1] - want[e][1]) < 1e-3 for e in want), (pairs[k], got, want)
        assert (pb.Verdict.Name(resp.verdict), resp.defect) == (outcome.verdict.value, outcome.defect), pairs[k]
        correct += (resp.verdict == pb.PASS) == (defect == "ok") and resp.verdict != pb.UNCERTAIN
    assert correct / len(pairs) >= 0.95, f"verdict accuracy {correct / len(pairs):.3f} against the ground truth"


def test_station_scores_your_files_exactly_from_the_wire(serving, default_spec, tmp_path):
    """`expertmesh station --images FOLDER --each 2`: every file sent exactly twice over gRPC, every answer scored
    against its folder's label (the exact served score: accuracy, escape and false-call rates, confusion matrix),
    the traces naming each file and its label, and each file's verdict the offline CoE's for it."""
    from PIL import Image

    from expertmesh.station import load_images, run_station

    pairs = [("chip_resistor", "ok"), ("chip_resistor", "misaligned"), ("sot23", "ok"), ("diode", "reversed_polarity"),
             ("qfp", "solder_bridge"), ("electrolytic_capacitor", "ok")]
    for k, (component, defect) in enumerate(pairs * 2):
        folder = tmp_path / "line" / component / defect
        folder.mkdir(parents=True, exist_ok=True)
        generator.generate(component, defect, 321, k).save(folder / f"part{k:02d}.png")
    pool = load_images(tmp_path / "line", {"ok"})
    traces = tmp_path / "traces.jsonl"
    report = run_station(serving.grpc_target, serving.tokens["factory-a"], "factory-a", rate_per_s=8,
                         duration_s=0.1, pool=pool, each=2, traces_path=traces, progress=False)
    assert report.failure() is None, report.errors_by_code
    assert report.num_sent == report.num_ok == 24 and (report.num_images, report.repeats) == (12, 2)
    assert sum(sum(row.values()) for row in report.confusion.values()) == 24
    assert sum(report.confusion["defective"].values()) == 12  # 3 defective pairs x 2 files x 2 sends
    assert report.escape_rate == report.confusion["defective"]["PASS"] / 12
    assert "exact score: each of 12 images sent 2 time(s)" in report.format()
    records = [json.loads(line) for line in traces.read_text().splitlines()]
    assert sorted(r["file"] for r in records) == sorted(p.file for p in pool for _ in range(2))
    by_file = {}
    for r in records:
        assert r["label"] == r["file"].split("/")[-2] and r["truth"] == ("PASS" if r["label"] == "ok" else "DEFECT")
        by_file.setdefault(r["file"], set()).add(r["verdict"])
    images = np.stack([np.asarray(Image.open(tmp_path / "line" / p.file).convert("RGB")) for p in pool])
    expected = offline_runs(default_spec, serving.zoo, images)
    for part, run in zip(pool, expected):
        assert by_file[part.file] == {aggregate(default_spec, run.outputs).verdict.value}, part.file


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


def inspect_qfp(serving, stub, i: int, timeout_s: float = 90.0) -> pb.InspectResponse:
    """A qfp part with the CAD hint: the rule `cad_qfp` forces qfp_defect into its plan."""
    return stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=png("qfp", "ok", i), component_hint="qfp"),
                        metadata=auth(serving), timeout=timeout_s)


def qfp_replica(resp: pb.InspectResponse) -> str:
    [trace] = [t for t in resp.experts if t.expert == "qfp_defect"]
    return trace.replica_id


def test_a_killed_expert_host_is_retried_on_a_replacement_or_named_in_unavailable(serving, stub):
    """Kill every replica of the expert host (which holds qfp_defect). Each request that needs it must end in one of
    the two documented ways: an answer from a replacement replica (a call whose replica died is retried within its
    deadline, README "Re-planning"), or UNAVAILABLE naming the expert (README "Errors"). An answer from a killed
    replica means nothing was killed, and a client deadline means the request hung: both fail. Then qfp_defect
    answers again."""
    killed_names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Host#" in a["name"]]
    killed = {a["name"].rsplit("#", 1)[1] for a in killed_names}
    assert killed and qfp_replica(inspect_qfp(serving, stub, 0)) in killed  # the ids traces carry
    for a in killed_names:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    outcomes = []
    for i in range(1, 6):
        try:
            replica = qfp_replica(inspect_qfp(serving, stub, i))
            assert replica not in killed, f"request {i} was answered by a killed replica: the kill did not happen"
            outcomes.append("answered by a replacement")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (i, err.code(), err.details())
            assert "qfp_defect" in err.details(), err.details()
            assert not any(stack in err.details() for stack in ("Traceback", "ray::", 'File "')), err.details()
            outcomes.append("UNAVAILABLE naming qfp_defect")
    print("after the kill:", outcomes)
    for a in killed_names:  # every killed replica is gone for good (Serve started new ones)
        with pytest.raises(ValueError):
            ray.get_actor(a["name"], namespace=a["namespace"])
    deadline = time.monotonic() + 90
    while True:  # Serve replaces the replicas: qfp_defect answers again, from a new one
        try:
            assert qfp_replica(inspect_qfp(serving, stub, 99, timeout_s=30)) not in killed
            break
        except grpc.RpcError as err:
            assert time.monotonic() < deadline, f"qfp_defect never came back: {err.code()} {err.details()}"
            time.sleep(1)
