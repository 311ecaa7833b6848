"""The gRPC service as Serve's proxy registers it (`grpc_servicer_functions`): the generated handlers of
`expertmesh.v1.InspectionService`, with request parsing that cannot fail and a lost replica answered as retryable.

With the generated handlers, bytes that are not a valid protobuf message make gRPC answer UNKNOWN with the parser's
exception text. Here such a request becomes `Unparsable`, which the proxy passes to the ingress like any request, and
the ingress answers INVALID_ARGUMENT naming the message type (`deployments/ingress.py`).

A request in flight inside an ingress replica that dies (its process killed, its node lost) reaches Serve's proxy as
a RayActorError, which the proxy answers INTERNAL with Ray's actor-death text. Nothing about the request was wrong and
another replica takes the retry, so the proxy's handlers for this service (Serve's `service_handler_factory`, wrapped
while this service registers) turn exactly that case into UNAVAILABLE, which clients retry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from expertmesh.v1 import inspection_pb2 as pb

SERVICE = "expertmesh.v1.InspectionService"
_REPLICA_LOSS = ("actor died", "actordiederror", "actorunavailableerror", "actor is unavailable", "rayactorerror")
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


def retryable_replica_loss(context) -> None:
    """INTERNAL with Ray's actor-death text (the proxy's answer for a replica that died mid-request) -> UNAVAILABLE."""
    if context.code() == grpc.StatusCode.INTERNAL and any(m in (context.details() or "").lower() for m in _REPLICA_LOSS):
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(REPLICA_LOST_DETAILS)


def _wrap_factory(factory: Callable) -> Callable:
    """Serve's handler factory, its unary and server-streaming handlers followed by `retryable_replica_loss`."""
    def make(service_method: str, streaming_type):
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if streaming_type.name == "UNARY_UNARY":
            async def unary(request, context):
                response = await handler(request, context)
                retryable_replica_loss(context)
                return response
            return unary
        if streaming_type.name == "UNARY_STREAM":
            async def stream(request, context):
                async for message in handler(request, context):
                    yield message
                retryable_replica_loss(context)
            return stream
        return handler
    return make


def add_inspection_service(servicer, server) -> None:
    """What `inspection_pb2_grpc.add_InspectionServiceServicer_to_server` does, with `_tolerant` parsing and, on
    Serve's proxy, `retryable_replica_loss` after each call (the proxy's factory is wrapped for this service only)."""
    factory = getattr(server, "service_handler_factory", None)  # Serve's gRPCGenericServer; absent elsewhere
    if factory is not None:
        server.service_handler_factory = _wrap_factory(factory)
    try:
        _register(servicer, server)
    finally:
        if factory is not None:
            server.service_handler_factory = factory


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
