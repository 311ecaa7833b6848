"""The gRPC service as Serve's proxy registers it (`grpc_servicer_functions`): the generated handlers of
`expertmesh.v1.InspectionService`, with request parsing that cannot fail.

With the generated handlers, bytes that are not a valid protobuf message make gRPC answer UNKNOWN with the parser's
exception text. Here such a request becomes `Unparsable`, which the proxy passes to the ingress like any request, and
the ingress answers INVALID_ARGUMENT naming the message type (`deployments/ingress.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from expertmesh.v1 import inspection_pb2 as pb

SERVICE = "expertmesh.v1.InspectionService"


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


def add_inspection_service(servicer, server) -> None:
    """What `inspection_pb2_grpc.add_InspectionServiceServicer_to_server` does, with `_tolerant` parsing."""
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
