"""The gRPC service as Serve's proxy registers it (`grpc_servicer_functions`): the generated handlers of
`expertmesh.v1.InspectionService`, with request parsing that cannot fail and a lost replica answered as retryable.

With the generated handlers, bytes that are not a valid protobuf message make gRPC answer UNKNOWN with the parser's
exception text. Here such a request becomes `Unparsable`, which the proxy passes to the ingress like any request, and
the ingress answers INVALID_ARGUMENT naming the message type (`deployments/ingress.py`).

A request in flight inside an ingress replica that dies (its process killed, its node lost) reaches Serve's proxy as
a RayActorError (ActorDiedError, ActorUnavailableError), which the proxy answers INTERNAL with Ray's actor-death
text. Nothing about the request was wrong and another replica takes the retry, so the proxy's status function is
wrapped when this service registers (`answer_replica_loss_unavailable`): an exception of those types, and nothing
else, becomes UNAVAILABLE, which clients retry. The types decide, not the text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from ray.exceptions import RayActorError
from ray.serve._private.proxy_request_response import ResponseStatus
from ray.serve.exceptions import gRPCStatusError

from expertmesh.v1 import inspection_pb2 as pb

SERVICE = "expertmesh.v1.InspectionService"
REPLICA_LOST_DETAILS = ("the ingress replica serving this request was lost (its process or node died); fix: retry, "
                        "another replica answers")


@dataclass(frozen=True)
class Unparsable:
    """A request whose bytes did not parse as `message_type`."""

    message_type: str


def _tolerant(message_cls) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError:
            return Unparsable(message_cls.DESCRIPTOR.full_name)
    return parse


def is_replica_loss(exc: BaseException) -> bool:
    """Whether `exc`, as it reaches the proxy, says the replica serving the request died (by type)."""
    if isinstance(exc, gRPCStatusError):
        exc = exc.original_exception
    return isinstance(exc, RayActorError)  # ActorDiedError and ActorUnavailableError included


def replica_loss_status(status_of: Callable) -> Callable:
    """Serve's `get_grpc_response_status(exc, request_timeout_s, request_id)`, a replica loss answered UNAVAILABLE."""
    if getattr(status_of, "__wrapped_status__", None) is not None:
        return status_of  # wrapped already

    def status(exc: BaseException, request_timeout_s, request_id: str):
        if is_replica_loss(exc):
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=REPLICA_LOST_DETAILS)
        return status_of(exc, request_timeout_s, request_id)

    status.__wrapped_status__ = status_of
    return status


def answer_replica_loss_unavailable() -> None:
    """In Serve's proxy process: its status function (looked up by name at each failed call) wrapped once."""
    from ray.serve._private import proxy

    proxy.get_grpc_response_status = replica_loss_status(proxy.get_grpc_response_status)


def add_inspection_service(servicer, server) -> None:
    """What `inspection_pb2_grpc.add_InspectionServiceServicer_to_server` does, with `_tolerant` parsing and, on
    Serve's proxy (its gRPCGenericServer has a `service_handler_factory`), a lost replica answered UNAVAILABLE."""
    if getattr(server, "service_handler_factory", None) is not None:
        answer_replica_loss_unavailable()
    _register(servicer, server)


def _register(servicer, server) -> None:
    handlers = {
        "Inspect": grpc.unary_unary_rpc_method_handler(
            servicer.Inspect, request_deserializer=_tolerant(pb.InspectRequest),
            response_serializer=pb.InspectResponse.SerializeToString),
        "InspectBoard": grpc.unary_stream_rpc_method_handler(
            servicer.InspectBoard, request_deserializer=_tolerant(pb.InspectBoardRequest),
            response_serializer=pb.InspectResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
