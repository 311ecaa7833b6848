"""The framework's own ceiling: a Ray Serve app answering `expertmesh.v1.InspectionService` with empty responses.

Deployed through Serve's real gRPC proxy with the options ExpertMesh's proxy runs with, it measures what a request
costs in Serve alone (proxy, one replica, the wire contract) with no work behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve
from ray.serve.deployment import Application

from expertmesh.v1 import inspection_pb2 as pb

NOOP_APP_NAME = "bench-noop"


@serve.deployment(name="NoopInspection", num_replicas=1, max_ongoing_requests=1024, max_queued_requests=-1,
                  ray_actor_options={"num_cpus": 0.1})
class NoopInspection:
    """Inspect answers an empty InspectResponse; InspectBoard one empty response per component."""

    async def Inspect(self, request: pb.InspectRequest) -> pb.InspectResponse:  # noqa: N802 - the gRPC method name
        return pb.InspectResponse()

    async def InspectBoard(self, request: pb.InspectBoardRequest) -> AsyncIterator[pb.InspectResponse]:  # noqa: N802
        for i in range(len(request.components)):
            yield pb.InspectResponse(component_index=i)


def noop_app(logging_config: dict | None = None) -> Application:
    """The no-op app, with the same Serve logging config as ExpertMesh's deployments (access log off by default)."""
    deployment = NoopInspection.options(logging_config=logging_config) if logging_config else NoopInspection
    return deployment.bind()
