"""INTERNAL for an unexpected error, on the wire (README "Errors": "anything unexpected: INTERNAL (request id only;
details in the replica log) / HTTP 500"), and a deliberate error from behind the ingress passed on as itself.

The real ingress (`IngressDeployment`, as the app builds it) runs as a second, probe application on the session's
Serve instance, in front of a router that raises an error no code path expects. Clients reach it through Serve's
real gRPC and HTTP proxies, using only the wire contract; they must get INTERNAL / 500 naming the request and
nothing of the error, which must be in the replica's log instead.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
import ray
from ray import serve

from expertmesh.deployments.ingress import IngressDeployment
from expertmesh.errors import Unavailable
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.images import encode_png
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc
from serving_fixture import metric_total

pytestmark = pytest.mark.integration

PROBE_APP = "internal-error-probe"
SECRET = "unexpected-detail-4c1d /srv/expertmesh/secret.yaml"  # what must not reach a client
PROBE_ROUTE = "/v1/inspect"  # the ingress answers this path only; the probe holds it while it runs


REFUSE_HINT = "refuse"  # a request with this component_hint gets the router's deliberate error instead


@serve.deployment
class ExplodingRouter:
    """A router whose every request fails in a way nothing expects (not an ExpertMeshError), or, asked to refuse,
    with a deliberate error, as the real router ends a request whose expert did not answer."""

    async def inspect_batch(self, images, metas) -> list:
        if any(meta.get("component_hint") == REFUSE_HINT for meta in metas):
            raise Unavailable("expert 'qfp_defect' did not answer within 30 s",
                              fix="retry later; if it persists, check the expert's replicas")
        raise RuntimeError(SECRET)


@pytest.fixture(scope="module")
def probe(serving):
    """The probe application; afterwards the session's app answers alone again (gRPC without app metadata, HTTP)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas cannot import this test module
    app = IngressDeployment.bind(str(serving.spec_path), str(serving.tokens_file), ExplodingRouter.bind())
    serve.run(app, name=PROBE_APP, route_prefix=PROBE_ROUTE)
    try:
        yield (("application", PROBE_APP), ("authorization", f"Bearer {serving.tokens['factory-a']}"))
    finally:
        serve.delete(PROBE_APP)
    with grpc.insecure_channel(serving.grpc_target) as ch:
        resp = pb_grpc.InspectionServiceStub(ch).Inspect(
            pb.InspectRequest(factory_id="factory-a", image=image()),
            metadata=(("authorization", f"Bearer {serving.tokens['factory-a']}"),), timeout=60)
    assert resp.experts, "the session's application does not answer after the probe"


def image() -> bytes:
    return encode_png(generator.generate("chip_resistor", "ok", 123, 0))


def assert_nothing_leaked(details: str) -> None:
    """No error text, exception name or stack (Python's or Ray's remote one: `ray::Replica...`, `File "..."`)."""
    for leak in (SECRET, "RuntimeError", "Traceback", "ray::", 'File "'):
        assert leak not in details, details


def test_unexpected_error_is_internal_with_the_request_id_only(serving, probe):
    internal_before = metric_total(serving.metrics_url, "ray_expertmesh_requests_total", code="INTERNAL", ingress="grpc")
    with grpc.insecure_channel(serving.grpc_target) as ch:
        stub = pb_grpc.InspectionServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Inspect(pb.InspectRequest(request_id="probe-1", factory_id="factory-a", image=image()), metadata=probe,
                         timeout=60)
        assert info.value.code() == grpc.StatusCode.INTERNAL, (info.value.code(), info.value.details())
        assert "probe-1" in info.value.details()
        assert_nothing_leaked(info.value.details())

        board = pb.InspectBoardRequest(board_id="probe-board", factory_id="factory-a",
                                       components=[pb.InspectRequest(image=image()) for _ in range(3)])
        with pytest.raises(grpc.RpcError) as info:
            list(stub.InspectBoard(board, metadata=probe, timeout=60))
        assert info.value.code() == grpc.StatusCode.INTERNAL, (info.value.code(), info.value.details())
        assert_nothing_leaked(info.value.details())

    body = json.dumps({"request_id": "probe-http", "factory_id": "factory-a",
                       "image": base64.b64encode(image()).decode()}).encode()
    req = urllib.request.Request(serving.http_url + PROBE_ROUTE, data=body, method="POST", headers={
        "content-type": "application/json", "authorization": f"Bearer {serving.tokens['factory-a']}"})
    with pytest.raises(urllib.error.HTTPError) as http_info:
        urllib.request.urlopen(req, timeout=60)
    text = http_info.value.read().decode()
    assert http_info.value.code == 500, text
    doc = json.loads(text)
    assert doc["request_id"] == "probe-http" and doc["error"]["code"] == "INTERNAL" and "probe-http" in doc["error"]["message"]
    assert_nothing_leaked(text)

    # counted as INTERNAL, and the details are in the ingress replica's log, not lost
    deadline = time.monotonic() + 20
    while metric_total(serving.metrics_url, "ray_expertmesh_requests_total", code="INTERNAL",
                       ingress="grpc") <= internal_before:
        assert time.monotonic() < deadline, "the INTERNAL answer was not counted in expertmesh_requests_total"
        time.sleep(0.5)
    logs = list(serving.ray_temp_dir.glob(f"session_*/logs/serve/replica_{PROBE_APP}_IngressDeployment_*.log"))
    assert any(SECRET in p.read_text(errors="replace") for p in logs), logs


def test_a_deliberate_router_error_reaches_the_client_as_its_own_status_and_message(serving, probe):
    """The router's own errors (an expert that did not answer: UNAVAILABLE naming it) cross a replica boundary to the
    ingress; the client must get that status and exactly that message with its fix, not a stack."""
    with grpc.insecure_channel(serving.grpc_target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.InspectionServiceStub(ch).Inspect(pb.InspectRequest(
                factory_id="factory-a", image=image(), component_hint=REFUSE_HINT), metadata=probe, timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (info.value.code(), info.value.details())
    assert info.value.details() == ("expert 'qfp_defect' did not answer within 30 s; "
                                    "fix: retry later; if it persists, check the expert's replicas"), info.value.details()
    assert_nothing_leaked(info.value.details())
