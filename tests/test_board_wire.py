"""InspectBoard on the wire, as a station's generic client sees it: the service learned from server reflection alone,
messages built by the .proto's field names, through Serve's real gRPC proxy. Every refusal must reach the client as
its status code and message; a stream ends OK only when every component was answered."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.images import encode_png

pytestmark = pytest.mark.integration

SERVICE = "expertmesh.v1.InspectionService"


@pytest.fixture(scope="module")
def board_call(serving):
    """(call, Board, Component): the InspectBoard method and its message classes, from reflection only."""
    with grpc.insecure_channel(serving.grpc_target) as ch:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        method = pool.FindServiceByName(SERVICE).FindMethodByName("InspectBoard")
        board_cls = message_factory.GetMessageClass(method.input_type)
        component_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("expertmesh.v1.InspectRequest"))
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = ch.unary_stream(f"/{SERVICE}/InspectBoard", request_serializer=board_cls.SerializeToString,
                               response_deserializer=response_cls.FromString)
        yield call, board_cls, component_cls


def images(n: int) -> list[bytes]:
    comps = generator.COMPONENTS
    return [encode_png(generator.generate(comps[i % len(comps)], "ok", 7, i)) for i in range(n)]


def run(serving, board_call, timeout_s=120, **board):
    """Stream a board; returns (responses, status code, details) as the client saw them."""
    call, board_cls, component_cls = board_call
    comps = [component_cls(**c) for c in board.pop("components")]
    got = []
    try:
        for r in call(board_cls(components=comps, **board),
                      metadata=(("authorization", f"Bearer {serving.tokens['factory-a']}"),), timeout=timeout_s):
            got.append(r)
    except grpc.RpcError as err:
        return got, err.code(), err.details()
    return got, grpc.StatusCode.OK, ""


def test_a_whole_board_ends_ok_with_one_result_per_component(serving, board_call):
    got, code, _ = run(serving, board_call, board_id="ok-1", factory_id="factory-a",
                       components=[{"image": b} for b in images(8)])
    assert code == grpc.StatusCode.OK
    assert sorted(r.component_index for r in got) == list(range(8))
    assert all(r.board_id == "ok-1" and r.verdict for r in got)


@pytest.mark.parametrize("case, board, code, fragment", [
    ("no board factory_id", {"board_id": "b"}, grpc.StatusCode.INVALID_ARGUMENT, "factory_id"),
    ("last image empty", {"factory_id": "factory-a", "empty_last": True}, grpc.StatusCode.INVALID_ARGUMENT,
     "components[2].image: image is empty"),
    ("another factory's component", {"factory_id": "factory-a", "other_factory": True},
     grpc.StatusCode.PERMISSION_DENIED, "components[1].factory_id"),
    ("4 MiB board_id", {"factory_id": "factory-a", "board_id": "x" * (4 << 20)}, grpc.StatusCode.INVALID_ARGUMENT,
     "board_id: board_id is 4194304 characters"),
    ("too many components", {"factory_id": "factory-a", "num": 513}, grpc.StatusCode.INVALID_ARGUMENT,
     "513 components, over the limit of 512"),
])
def test_a_refused_board_reaches_the_client_as_its_status(serving, board_call, case, board, code, fragment):
    num = board.pop("num", 3)
    comps = [{"image": b} for b in images(3)] + [{"image": b"\x89PNG"}] * (num - 3)
    if board.pop("empty_last", False):
        comps[-1] = {"image": b""}
    if board.pop("other_factory", False):
        comps[1] = {**comps[1], "factory_id": "factory-b"}
    got, got_code, details = run(serving, board_call, components=comps, **board)
    assert (got_code, got) == (code, []), f"{case}: {got_code} after {len(got)} results"
    assert fragment in details and "fix:" in details


def test_a_component_that_does_not_decode_refuses_the_board_before_any_result_streams(serving, board_call):
    comps = [{"image": b} for b in images(5)]
    comps[2] = {"image": b"\x89PNG\r\n\x1a\n not really a png"}  # passes the field checks, fails to decode
    got, code, details = run(serving, board_call, board_id="mid", factory_id="factory-a", components=comps)
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, [])  # every component is decoded before the first result
    assert details.startswith("components[2].image:") and "fix:" in details
