"""The service as Serve's proxy registers it (`deployments/grpc_service.py`), without a Ray cluster: tolerant
parsing, and a replica lost mid-request (a RayActorError, by type) answered UNAVAILABLE (retryable) instead of the
proxy's INTERNAL."""

from __future__ import annotations

import grpc

from expertmesh.deployments.grpc_service import (REPLICA_LOST_DETAILS, Unparsable, _tolerant, add_inspection_service,
                                                 replica_loss_status)
from expertmesh.v1 import inspection_pb2 as pb


class Servicer:  # Serve's proxy registers a dummy servicer: its methods are replaced by the factory's
    def Inspect(self, request, context): ...

    def InspectBoard(self, request, context): ...


class ProxyLikeServer:
    """What matters of Serve's gRPCGenericServer at registration: it has a `service_handler_factory`."""

    def __init__(self):
        self.service_handler_factory, self.handlers = object(), {}

    def add_generic_rpc_handlers(self, handlers):
        pass

    def add_registered_method_handlers(self, service, handlers):
        self.handlers[service] = handlers


def test_a_replica_that_died_mid_request_is_unavailable_by_its_type_not_its_text(monkeypatch):
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve._private import proxy
    from ray.serve._private.grpc_util import get_grpc_response_status
    from ray.serve.exceptions import gRPCStatusError

    status = replica_loss_status(get_grpc_response_status)  # Serve's own mapping, wrapped
    for lost in (ActorDiedError(), ActorUnavailableError("its node died", None), gRPCStatusError(ActorDiedError())):
        answer = status(lost, 30.0, "r1")
        assert (answer.code, answer.message, answer.is_error) == (grpc.StatusCode.UNAVAILABLE, REPLICA_LOST_DETAILS, True)
    # the text alone decides nothing: an error that only says so stays Serve's INTERNAL
    assert status(RuntimeError("The actor died unexpectedly"), 30.0, "r1").code == grpc.StatusCode.INTERNAL
    assert status(TimeoutError(), 30.0, "r1").code == grpc.StatusCode.DEADLINE_EXCEEDED  # the rest as Serve answers

    # registering on Serve's proxy wraps its status function once (it looks the name up at every failed call)
    monkeypatch.setattr(proxy, "get_grpc_response_status", get_grpc_response_status)
    server = ProxyLikeServer()
    add_inspection_service(Servicer(), server)
    add_inspection_service(Servicer(), server)
    wrapped = proxy.get_grpc_response_status
    assert wrapped is not get_grpc_response_status and wrapped.__wrapped_status__ is get_grpc_response_status
    assert set(server.handlers["expertmesh.v1.InspectionService"]) == {"Inspect", "InspectBoard"}


def test_bytes_that_are_no_protobuf_parse_as_unparsable_not_an_exception():
    parse = _tolerant(pb.InspectRequest)
    assert parse(pb.InspectRequest(factory_id="f").SerializeToString()).factory_id == "f"
    assert parse(b"\xff\xff\xff\xff\x0f garbage") == Unparsable("expertmesh.v1.InspectRequest")
