"""The service as Serve's proxy registers it (`deployments/grpc_service.py`), without Ray: tolerant parsing, and a
replica lost mid-request answered UNAVAILABLE (retryable) instead of the proxy's INTERNAL."""

from __future__ import annotations

import asyncio
import enum

import grpc

from expertmesh.deployments.grpc_service import REPLICA_LOST_DETAILS, Unparsable, _tolerant, add_inspection_service
from expertmesh.v1 import inspection_pb2 as pb


class Servicer:  # Serve's proxy registers a dummy servicer: its methods are replaced by the factory's
    def Inspect(self, request, context): ...

    def InspectBoard(self, request, context): ...


class Streaming(enum.Enum):  # the names Serve's gRPCStreamingType has
    UNARY_UNARY = 1
    UNARY_STREAM = 2


class Context:
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details


class ProxyLikeServer:
    """What Serve's gRPCGenericServer does at registration: every handler comes from its factory."""

    def __init__(self, outcome):
        self.outcome, self.handlers = outcome, {}
        self.service_handler_factory = self._factory

    def _factory(self, service_method, streaming_type):
        async def unary(request, context):
            context.set_code(self.outcome[0])
            context.set_details(self.outcome[1])
            return b""

        async def stream(request, context):
            yield b"first"
            context.set_code(self.outcome[0])
            context.set_details(self.outcome[1])
        return unary if streaming_type.name == "UNARY_UNARY" else stream

    def add_generic_rpc_handlers(self, handlers):
        pass

    def add_registered_method_handlers(self, service, handlers):
        for name, h in handlers.items():
            kind = Streaming.UNARY_STREAM if h.response_streaming else Streaming.UNARY_UNARY
            self.handlers[name] = self.service_handler_factory(service_method=f"/{service}/{name}", streaming_type=kind)


def call(server, name):
    context = Context(grpc.StatusCode.OK, "")

    async def go():
        handler = server.handlers[name]
        if name == "Inspect":
            await handler(None, context)
        else:
            async for _ in handler(None, context):
                pass
    asyncio.run(go())
    return context.code(), context.details()


def test_a_replica_that_died_mid_request_is_unavailable_not_internal_and_the_factory_is_restored():
    died = (grpc.StatusCode.INTERNAL, "The actor died unexpectedly before finishing this task.\n\tclass_name: ...")
    server = ProxyLikeServer(died)
    original = server.service_handler_factory
    add_inspection_service(Servicer(), server)
    assert server.service_handler_factory == original  # other services register with Serve's own factory
    for name in ("Inspect", "InspectBoard"):
        assert call(server, name) == (grpc.StatusCode.UNAVAILABLE, REPLICA_LOST_DETAILS)
    ours = (grpc.StatusCode.INTERNAL, "internal error (request r1); fix: retry; report the request id if it persists")
    server = ProxyLikeServer(ours)
    add_inspection_service(Servicer(), server)
    assert call(server, "Inspect") == ours  # the ingress's own INTERNAL stays what it is
    refused = (grpc.StatusCode.INVALID_ARGUMENT, "image: ...")
    server = ProxyLikeServer(refused)
    add_inspection_service(Servicer(), server)
    assert call(server, "InspectBoard") == refused


def test_bytes_that_are_no_protobuf_parse_as_unparsable_not_an_exception():
    parse = _tolerant(pb.InspectRequest)
    assert parse(pb.InspectRequest(factory_id="f").SerializeToString()).factory_id == "f"
    assert parse(b"\xff\xff\xff\xff\x0f garbage") == Unparsable("expertmesh.v1.InspectRequest")
