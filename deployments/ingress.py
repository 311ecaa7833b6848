"""The ingress deployment: gRPC (`expertmesh.v1.InspectionService` through Serve's gRPC proxy) and HTTP.

Both ingresses share one path: authenticate the factory's bearer token, validate and decode the
image once, ask the router, and map any `ExpertMeshError` to a status through `expertmesh.errors`
(gRPC status + details, or HTTP status + JSON body). Anything unexpected becomes INTERNAL with
the request id and no stack trace; the stack goes to the log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from expertmesh.errors import (ExpertMeshError, Internal, InvalidArgument, NotFound, PayloadTooLarge, grpc_status)
from expertmesh.deployments.auth import TokenTable
from expertmesh.deployments.router import bounded as bounded_call
from expertmesh.experts.preprocess import decode_image
from expertmesh.experts.spec import load_spec
from expertmesh.metrics import bounded, instruments
from expertmesh.v1 import inspection_pb2 as pb

ROUTER_CALL_TIMEOUT_S = 300.0  # a backstop: the proxies' request_timeout_s answers stations first
logger = logging.getLogger("ray.serve")
_VERDICTS = {"PASS": pb.PASS, "DEFECT": pb.DEFECT, "UNCERTAIN": pb.UNCERTAIN}
_MAX_ID_CHARS = 128


def _request_fields(request_id: str, factory_id: str, station_id: str, component_hint: str, metadata: dict) -> dict:
    if not factory_id:
        raise InvalidArgument("factory_id is missing", field="factory_id", fix="set factory_id to your factory's id")
    for name, value in (("request_id", request_id), ("factory_id", factory_id), ("station_id", station_id),
                        ("component_hint", component_hint)):
        if len(value) > _MAX_ID_CHARS:
            raise InvalidArgument(f"{name} is {len(value)} characters, over {_MAX_ID_CHARS}", field=name,
                                  fix=f"send at most {_MAX_ID_CHARS} characters")
    return {"component_hint": component_hint, "station_id": station_id, "factory_id": factory_id,
            "product": str(metadata.get("product", ""))[:_MAX_ID_CHARS]}


def to_proto(request_id: str, result: dict, board_id: str = "", index: int = 0) -> pb.InspectResponse:
    return pb.InspectResponse(
        request_id=request_id, category=result["category"], category_confidence=result["category_confidence"],
        verdict=_VERDICTS[result["verdict"]], defect=result["defect"], latency_ms=result["latency_ms"],
        board_id=board_id, component_index=index,
        experts=[pb.ExpertTrace(expert=t["expert"], label=t["label"], score=t["score"], latency_ms=t["latency_ms"],
                                reason=t["reason"], because_of=t["because_of"],
                                node_id=t["node_id"], replica_id=t["replica_id"]) for t in result["trace"]])


@serve.deployment
class IngressDeployment:
    def __init__(self, spec_path: str | None, tokens_file: str, router: DeploymentHandle) -> None:
        self.spec = load_spec(spec_path)
        self.tokens = TokenTable.load(tokens_file)
        self.router = router
        self.metrics = instruments()
        self._factories = self.tokens.factories | {"none"}

    def _record(self, ingress: str, factory_id: str, t0: float, code: str, verdict: str | None = None) -> None:
        """One answered inspection: its outcome, verdict and latency (factory folded to the tokens file's ids)."""
        factory = bounded(factory_id or "none", self._factories)
        self.metrics.inc("expertmesh_requests_total", factory=factory, ingress=ingress, code=code)
        self.metrics.observe("expertmesh_request_latency_seconds", time.perf_counter() - t0, ingress=ingress)
        if verdict:
            self.metrics.inc("expertmesh_verdicts_total", factory=factory, verdict=verdict)

    # ------------------------------------------------------------------ shared path
    async def _inspect(self, authorization: str | None, request_id: str, factory_id: str, station_id: str,
                       image: bytes, component_hint: str, metadata: dict) -> tuple[str, dict]:
        meta = _request_fields(request_id, factory_id, station_id, component_hint, metadata)
        self.tokens.authorize(authorization, factory_id)
        request_id = request_id or uuid.uuid4().hex
        array = np.asarray(decode_image(image, self.spec.image, field="image"))
        # a router replica lost mid-request (its node went away) is retried with backoff within the deadline
        return request_id, await bounded_call(lambda: self.router.inspect.remote(array, meta), ROUTER_CALL_TIMEOUT_S,
                                              "the router", timeout_fix="retry later", full_fix="retry later with backoff",
                                              failure_fix="retry; report the request id if it persists",
                                              wrap_failures=False)

    @staticmethod
    def _internal(exc: Exception, request_id: str) -> Internal:
        logger.exception("request %s failed", request_id or "<no id>")
        return Internal(f"internal error (request {request_id or 'without id'})", fix="retry; report the request id if it persists")

    # ------------------------------------------------------------------ gRPC
    @staticmethod
    def _authorization(grpc_context) -> str | None:
        return next((v for k, v in grpc_context.invocation_metadata() if k.lower() == "authorization"), None)

    @staticmethod
    def _fail(grpc_context, err: ExpertMeshError) -> None:
        grpc_context.set_code(grpc_status(err))
        grpc_context.set_details(str(err))

    async def Inspect(self, request: pb.InspectRequest, grpc_context) -> pb.InspectResponse:
        t0 = time.perf_counter()
        try:
            rid, result = await self._inspect(self._authorization(grpc_context), request.request_id, request.factory_id,
                                              request.station_id, request.image, request.component_hint, dict(request.metadata))
            self._record("grpc", request.factory_id, t0, "OK", result["verdict"])
            return to_proto(rid, result)
        except ExpertMeshError as err:
            failure = err
        except Exception as exc:  # noqa: BLE001 - the one place unexpected errors become INTERNAL
            failure = self._internal(exc, request.request_id)
        self._record("grpc", request.factory_id, t0, failure.code.value)
        self._fail(grpc_context, failure)
        return pb.InspectResponse(request_id=request.request_id)

    async def InspectBoard(self, request: pb.InspectBoardRequest, grpc_context) -> AsyncIterator[pb.InspectResponse]:
        authorization = self._authorization(grpc_context)
        t_board, streaming = time.perf_counter(), False
        try:
            if not request.components:
                raise InvalidArgument("the board has no components", field="components", fix="send at least one component image")
            for i, c in enumerate(request.components):  # validate everything before streaming anything
                _request_fields(c.request_id, c.factory_id or request.factory_id, c.station_id or request.station_id,
                                c.component_hint, dict(c.metadata))
            self.tokens.authorize(authorization, request.factory_id)

            async def one(i: int, c: pb.InspectRequest):
                t0 = time.perf_counter()
                try:
                    rid, result = await self._inspect(
                        authorization, c.request_id or f"{request.board_id}-{i}", c.factory_id or request.factory_id,
                        c.station_id or request.station_id, c.image, c.component_hint, dict(c.metadata))
                except ExpertMeshError as err:
                    self._record("grpc_board", request.factory_id, t0, err.code.value)
                    err.field = f"components[{i}].{err.field}" if err.field else f"components[{i}]"
                    raise
                self._record("grpc_board", request.factory_id, t0, "OK", result["verdict"])
                return to_proto(rid, result, request.board_id, i)

            streaming = True  # from here on every component counts itself
            for fut in asyncio.as_completed([one(i, c) for i, c in enumerate(request.components)]):
                yield await fut
        except ExpertMeshError as err:
            if not streaming:  # a board refused before any component ran counts once
                self._record("grpc_board", request.factory_id, t_board, err.code.value)
            self._fail(grpc_context, err)
        except Exception as exc:  # noqa: BLE001
            self._record("grpc_board", request.factory_id, t_board, "INTERNAL")
            self._fail(grpc_context, self._internal(exc, request.board_id))

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, http: Request) -> JSONResponse:
        rid, factory_id, t0 = "", "", time.perf_counter()
        try:
            if http.url.path.rstrip("/") != "/v1/inspect":
                raise NotFound(f"no route {http.url.path!r}", field="path", fix="POST /v1/inspect")
            if http.method != "POST":
                raise InvalidArgument(f"method {http.method} not allowed", field="method", fix="use POST /v1/inspect")
            body = await http.body()
            if len(body) > 2 * self.spec.image.max_bytes:  # base64 is 4/3 of the image, plus the JSON
                raise PayloadTooLarge(f"body is {len(body)} bytes", field="image",
                                      fix=f"send an image of at most {self.spec.image.max_bytes} bytes")
            try:
                doc = json.loads(body)
            except ValueError:
                raise InvalidArgument("body is not JSON", field="body", fix="send a JSON object") from None
            if not isinstance(doc, dict):
                raise InvalidArgument("body is not a JSON object", field="body", fix="send a JSON object")
            rid = str(doc.get("request_id") or "")
            try:
                image = base64.b64decode(str(doc.get("image") or ""), validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument("image is not valid base64", field="image", fix="base64-encode the PNG/JPEG bytes") from None
            metadata = doc.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise InvalidArgument("metadata is not an object", field="metadata", fix="send a JSON object of strings")
            factory_id = str(doc.get("factory_id") or "")
            rid, result = await self._inspect(http.headers.get("authorization"), rid, factory_id,
                                              str(doc.get("station_id") or ""), image, str(doc.get("component_hint") or ""),
                                              metadata)
            self._record("http", factory_id, t0, "OK", result["verdict"])
            return JSONResponse({"request_id": rid, **{k: result[k] for k in (
                "category", "category_confidence", "verdict", "defect", "latency_ms")},
                "experts": [{k: t.get(k, "") for k in ("expert", "label", "score", "latency_ms", "reason", "because_of",
                                                          "node_id", "replica_id")} for t in result["trace"]]})
        except ExpertMeshError as err:
            self._record("http", factory_id, t0, err.code.value)
            return JSONResponse({"error": err.to_dict(), "request_id": rid}, status_code=err.http_status)
        except Exception as exc:  # noqa: BLE001
            err = self._internal(exc, rid)
            self._record("http", factory_id, t0, err.code.value)
            return JSONResponse({"error": err.to_dict(), "request_id": rid}, status_code=err.http_status)
