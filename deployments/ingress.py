"""The ingress deployment: gRPC (`expertmesh.v1.InspectionService` through Serve's gRPC proxy) and HTTP.

Both ingresses share one path, each step bounded before the next costs anything: check the fields (ids, metadata:
`deployments.limits`), authenticate the factory's bearer token, fix the request's deadline (`deployments.deadline`),
admit it under the factory's quota and fair share (`deployments.admission`: refused with RESOURCE_EXHAUSTED, or
queued behind other factories until its deadline), decode the image once on the decode threads and resize it to every
expert input size (a few KB instead of the image), and hand it to a batcher (`deployments/batcher.py`) that sends
concurrent requests to the router together: one router call per batch, not per request, the batch formed when a
call slot frees so it takes everything that queued meanwhile. Any `ExpertMeshError` maps to a status through
`expertmesh.errors` (gRPC status + details, or HTTP status + JSON body). Anything unexpected becomes INTERNAL with
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
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from expertmesh.errors import (ErrorCode, ExpertMeshError, Internal, InvalidArgument, NotFound, PayloadTooLarge,
                               grpc_status)
from expertmesh.deployments.admission import Admission, Ticket
from expertmesh.deployments.auth import ReloadingTokens
from expertmesh.deployments.batcher import Batcher
from expertmesh.deployments.board import (MAX_ID_CHARS, BoardComponent, BoardLimits, board_outcome, check_board,
                                          check_ids, component_error, echo_id)
from expertmesh.deployments.grpc_service import Unparsable
from expertmesh.deployments.deadline import TIMEOUT_HEADER, Deadline, call_with_deadline, exceeded, request_budget_s
from expertmesh.deployments.limits import IngressLimits, check_metadata
from expertmesh.experts.images import decode_image, resize_for
from expertmesh.experts.spec import load_spec
from expertmesh.metrics import instruments, label_or_other
from expertmesh.v1 import inspection_pb2 as pb

class StreamEnded(Exception):
    """Raised to end a gRPC server stream with the status already set on its context (see `_end_stream`)."""


MAX_CONCURRENT_BATCHES = 2  # batches in flight to the router at once: one classifies while one is on the hosts,
# and a batch held up (a host lost mid-call, cancelled within a second) does not stop the next
logger = logging.getLogger("ray.serve")
_VERDICTS = {"PASS": pb.PASS, "DEFECT": pb.DEFECT, "UNCERTAIN": pb.UNCERTAIN}


def _request_fields(request_id: str, factory_id: str, station_id: str, component_hint: str, metadata,
                    limits: IngressLimits, prefix: str = "") -> dict:
    """What the router needs of a request, every field checked (ids, metadata) before anything is copied."""
    if not factory_id:
        raise InvalidArgument("factory_id is missing", field=prefix + "factory_id",
                              fix="set factory_id to your factory's id")
    check_ids((("request_id", request_id), ("factory_id", factory_id), ("station_id", station_id),
               ("component_hint", component_hint)), prefix=prefix)
    extra = check_metadata(metadata, limits, prefix)
    return {"component_hint": component_hint, "station_id": station_id, "factory_id": factory_id,
            "product": extra.get("product", "")[:MAX_ID_CHARS]}


def to_proto(request_id: str, result: dict, board_id: str = "", index: int = 0) -> pb.InspectResponse:
    return pb.InspectResponse(
        request_id=request_id, category=result["category"], category_confidence=result["category_confidence"],
        verdict=_VERDICTS[result["verdict"]], defect=result["defect"], latency_ms=result["latency_ms"],
        board_id=board_id, component_index=index, coe_version=result.get("coe_version", ""),
        experts=[pb.ExpertTrace(**t.wire()) for t in result["trace"]])


UNAUTHENTICATED_LABEL = "unauthenticated"  # the factory label of a request whose token failed


async def read_body(http: Request, max_bytes: int) -> bytes:
    """The request body, refused (PAYLOAD_TOO_LARGE) before it is buffered when its Content-Length, or the bytes
    streamed so far, pass `max_bytes`; a Content-Length that is not a number is INVALID_ARGUMENT."""
    fix = f"send an image of at most {max_bytes // 2} bytes"
    declared = http.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise InvalidArgument(f"content-length is {declared[:32]!r}", field="content-length",
                                  fix="send the body's length in bytes, or no content-length")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"body is {int(declared)} bytes, over the limit of {max_bytes}", field="image", fix=fix)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"body passed the limit of {max_bytes} bytes", field="image", fix=fix)
        chunks.append(chunk)
    return b"".join(chunks)


_STRING_FIELDS = ("request_id", "factory_id", "station_id", "component_hint", "image", "coe")


def parse_body(body: bytes) -> dict:
    """`POST /v1/inspect`'s JSON body -> its fields (the image decoded from base64), every field's type checked:
    INVALID_ARGUMENT naming the field, never a value coerced into another type."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        raise InvalidArgument("body is not JSON, or is nested too deeply", field="body",
                              fix="send a flat JSON object (request_id, factory_id, image, metadata of strings)") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("body is not a JSON object", field="body", fix="send a JSON object")
    for name in _STRING_FIELDS:
        if doc.get(name) is not None and not isinstance(doc[name], str):
            raise InvalidArgument(f"{name} is a JSON {type(doc[name]).__name__}, not a string", field=name,
                                  fix=f"send {name} as a JSON string")
    fields = {name: doc.get(name) or "" for name in _STRING_FIELDS}
    try:
        fields["image"] = base64.b64decode(fields["image"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("image is not valid base64", field="image", fix="base64-encode the PNG/JPEG bytes") from None
    fields["metadata"] = {} if doc.get("metadata") is None else doc["metadata"]
    return fields


@serve.deployment
class IngressDeployment:
    def __init__(self, spec_path: str | None, tokens_file: str, router: DeploymentHandle,
                 board_limits: dict | None = None, route_batch: dict | None = None,
                 max_in_flight_components: int = 256, limits: dict | None = None,
                 placement_controller: DeploymentHandle | None = None) -> None:
        self.spec = load_spec(spec_path)
        self.input_sizes_px = self.spec.input_sizes_px  # every revision's (reconfigure: a live change adds sizes)
        self.served = [self.spec.name]  # the CoEs served (spec names), this app's first (reconfigure: the others)
        self.tokens = ReloadingTokens(tokens_file, on_error=logger.error)  # rotated tokens apply without a restart
        self.router = router
        self.placement_controller = placement_controller  # the in-cluster controller, when the app runs one
        self.board_limits = BoardLimits.model_validate(board_limits or {})
        self.limits = IngressLimits.model_validate(limits or {})
        self.admission = Admission(max_in_flight_components)
        self._waiters: dict[Ticket, asyncio.Event] = {}
        self._decoder = ThreadPoolExecutor(self.limits.decode_threads, thread_name_prefix="decode")  # off the loop
        batch = route_batch or {}
        self._batcher = Batcher(self._route, max_size=int(batch.get("max_size", 64)),
                                wait_s=float(batch.get("wait_s", 0.005)), max_in_flight=MAX_CONCURRENT_BATCHES)
        self.metrics = instruments()

    def reconfigure(self, user_config: dict) -> None:
        """The input sizes every served revision needs (`expertmesh rollout`, several CoEs): learnt before any router
        uses them; and the CoEs served beside the app's own."""
        self.input_sizes_px = tuple(sorted({*self.spec.input_sizes_px, *(user_config.get("input_sizes_px") or ())}))
        self.served = [self.spec.name, *(user_config.get("coes") or [])]

    def _record(self, ingress: str, factory_id: str, t0: float, code: str, verdict: str | None = None,
                coe: str = "") -> None:
        """One answered inspection: its outcome, verdict and latency (factory folded to the tokens file's ids; a failed
        authentication or authorization counts as `unauthenticated`, never as the factory the client claimed)."""
        failed_auth = code in (ErrorCode.UNAUTHENTICATED.value, ErrorCode.PERMISSION_DENIED.value)
        known = self.tokens.factories | {"none"}
        factory = UNAUTHENTICATED_LABEL if failed_auth else label_or_other(factory_id or "none", known)
        coe = label_or_other(coe or "none", {*self.served, "none"})
        self.metrics.inc("expertmesh_requests_total", factory=factory, coe=coe, ingress=ingress, code=code)
        self.metrics.observe("expertmesh_request_latency_seconds", time.perf_counter() - t0, ingress=ingress)
        if verdict:
            self.metrics.inc("expertmesh_verdicts_total", factory=factory, coe=coe, verdict=verdict)

    # ------------------------------------------------------------------ admission (deployments.admission)
    async def _admit(self, factory: str, num_components: int, deadline: Deadline, what: str = "request") -> None:
        """Admit now, or wait in the factory's fair queue until a slot goes to it (or the deadline passes)."""
        ticket = self.admission.arrive(factory, num_components, self.tokens.quota(factory), time.monotonic(), what)
        if ticket is None:
            return
        woken = self._waiters[ticket] = asyncio.Event()
        try:
            await asyncio.wait_for(woken.wait(), deadline.remaining_s())
        except asyncio.TimeoutError:
            self._wake(self.admission.abandon(ticket))
            raise exceeded("while queued at the ingress behind other requests") from None
        except asyncio.CancelledError:
            self._wake(self.admission.abandon(ticket))
            raise
        finally:
            del self._waiters[ticket]

    def _release(self, factory: str, num_components: int) -> None:
        self._wake(self.admission.release(factory, num_components))

    def _wake(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self._waiters[ticket].set()

    # ------------------------------------------------------------------ shared path
    def _deadline(self, timeout_header: str | None) -> Deadline:
        return Deadline(request_budget_s(timeout_header, self.limits.request_timeout_s))

    async def _decode(self, image: bytes, field: str = "image") -> dict[int, np.ndarray]:
        """Decode and resize to every expert input size, on the decode threads (never on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._decoder, lambda: resize_for(decode_image(image, self.spec.image, field=field),
                                              self.input_sizes_px))

    async def _inspect(self, authorization: str | None, request_id: str, factory_id: str, station_id: str,
                       image: bytes, component_hint: str, metadata, timeout_header: str | None,
                       coe: str = "") -> tuple[str, dict]:
        """Check, authorize, admit, decode once, and route with the batch, all within the request's deadline."""
        meta = _request_fields(request_id, factory_id, station_id, component_hint, metadata, self.limits)
        self.tokens.authorize(authorization, factory_id)
        meta["coe"] = self.tokens.coe(factory_id, coe, self.served)
        deadline = self._deadline(timeout_header)
        await self._admit(factory_id, 1, deadline)
        try:
            sized = await self._decode(image)
            result = await self._routed(sized, meta, deadline)
        finally:
            self._release(factory_id, 1)
        return request_id or uuid.uuid4().hex, result

    async def _routed(self, sized: dict[int, np.ndarray], meta: dict, deadline: Deadline) -> dict:
        """One decoded request through the batcher to the router, within its deadline."""
        try:
            result = await asyncio.wait_for(self._batcher.submit((sized, meta, deadline)), deadline.remaining_s())
        except asyncio.TimeoutError:
            raise exceeded("waiting for the router") from None
        if isinstance(result, ExpertMeshError):
            raise result
        return result

    async def _route(self, items: list[tuple[dict[int, np.ndarray], dict, Deadline]]) -> list[dict | ExpertMeshError]:
        """Concurrent requests -> one router call per set of input sizes (one, but while a live change adds a size)."""
        groups: dict[frozenset[int], list[int]] = {}
        for k, (sized, _, _) in enumerate(items):
            groups.setdefault(frozenset(sized), []).append(k)
        if len(groups) == 1:
            return await self._route_group(items)
        out: list = [None] * len(items)
        done = await asyncio.gather(*(self._route_group([items[k] for k in ks]) for ks in groups.values()))
        for ks, results in zip(groups.values(), done):
            for k, r in zip(ks, results):
                out[k] = r
        return out

    async def _route_group(self, items: list[tuple[dict[int, np.ndarray], dict, Deadline]]
                           ) -> list[dict | ExpertMeshError]:
        """Requests with the same input sizes -> one router call: each size stacked into one array [N, S, S, 3]; each
        request carries the budget it has left, and the call lasts at most as long as the latest of them."""
        metas = [{**meta, "budget_s": deadline.for_next_hop()} for _, meta, deadline in items]
        images = {size: np.stack([sized[size] for sized, _, _ in items]) for size in items[0][0]}
        timeout_s = max(m["budget_s"] for m in metas)
        try:  # a router replica lost mid-call (its node went away) is retried with backoff within the deadline
            return await call_with_deadline(
                lambda: self.router.inspect_batch.remote(images, metas), timeout_s, "the router",
                timeout_fix="retry later", full_fix="retry later with backoff",
                failure_fix="retry; report the request id if it persists", wrap_failures=False,
                on_timeout=lambda: exceeded("waiting for the router"))
        except ExpertMeshError as err:  # the whole batch failed the same way: each request gets the error
            return [err] * len(metas)

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

    @classmethod
    def _end_stream(cls, grpc_context, err: ExpertMeshError) -> NoReturn:
        """End a server stream with `err`'s status. Serve's proxy sends a stream's context along with each message,
        so a code set after the last message never arrives; a code set on the context *and raised* does (the replica
        wraps it as a gRPCStatusError carrying that code and details, and the proxy answers with them)."""
        cls._fail(grpc_context, err)
        raise StreamEnded(err)

    @staticmethod
    def _metadata_value(grpc_context, key: str) -> str | None:
        return next((v for k, v in grpc_context.invocation_metadata() if k.lower() == key), None)

    def _unparsable(self, request: Unparsable, grpc_context, ingress: str, t0: float) -> InvalidArgument:
        err = InvalidArgument(f"the request is not a valid {request.message_type} message", field="request",
                              fix="send a message serialized from the service's .proto (expertmesh/v1/inspection.proto)")
        self._record(ingress, "", t0, err.code.value)
        self._fail(grpc_context, err)
        return err

    async def Inspect(self, request: pb.InspectRequest | Unparsable, grpc_context) -> pb.InspectResponse:
        t0 = time.perf_counter()
        if isinstance(request, Unparsable):
            self._unparsable(request, grpc_context, "grpc", t0)
            return pb.InspectResponse()
        try:
            rid, result = await self._inspect(self._authorization(grpc_context), request.request_id, request.factory_id,
                                              request.station_id, request.image, request.component_hint,
                                              request.metadata, self._metadata_value(grpc_context, TIMEOUT_HEADER),
                                              request.coe)
            self._record("grpc", request.factory_id, t0, "OK", result["verdict"], result.get("coe", ""))
            return to_proto(rid, result)
        except ExpertMeshError as err:
            failure = err
        except Exception as exc:  # noqa: BLE001 - the one place unexpected errors become INTERNAL
            failure = self._internal(exc, request.request_id)
        self._record("grpc", request.factory_id, t0, failure.code.value)
        self._fail(grpc_context, failure)
        return pb.InspectResponse(request_id=echo_id(request.request_id))

    async def InspectBoard(self, request: pb.InspectBoardRequest, grpc_context) -> AsyncIterator[pb.InspectResponse]:
        """Check the board whole and decode every component, then stream each component's result as it completes
        (at most `board_limits.max_in_flight` at once). A board refused up front (a bad field, a component that does
        not decode, a quota) streams nothing. Ends OK only when every component answered; otherwise with the status
        of the first failure and a message naming every failed component (see `deployments.board`)."""
        t_board = time.perf_counter()
        if isinstance(request, Unparsable):
            raise StreamEnded(self._unparsable(request, grpc_context, "grpc_board", t_board))
        factory, num = request.factory_id, len(request.components)
        try:
            metas = self._check_board(request)
            self.tokens.authorize(self._authorization(grpc_context), factory)
            for i, (meta, c) in enumerate(zip(metas, request.components)):
                meta["coe"] = self.tokens.coe(meta["factory_id"], c.coe or request.coe, self.served,
                                              field=f"components[{i}].coe" if c.coe else "coe")
            deadline = self._deadline(self._metadata_value(grpc_context, TIMEOUT_HEADER))
            await self._admit(factory, num, deadline, "board")
        except ExpertMeshError as err:  # refused whole: counts once, streams nothing
            self._record("grpc_board", factory, t_board, err.code.value)
            self._end_stream(grpc_context, err)
        except Exception as exc:  # noqa: BLE001 - the one place unexpected errors become INTERNAL (no detail leaked)
            self._record("grpc_board", factory, t_board, "INTERNAL")
            self._end_stream(grpc_context, self._internal(exc, request.board_id))
        try:
            try:
                sized = await self._decode_board(request)
            except ExpertMeshError as err:  # a component that does not decode: the board is refused whole
                self._record("grpc_board", factory, t_board, err.code.value)
                self._end_stream(grpc_context, err)
            failures: dict[int, ExpertMeshError] = {}
            async for index, outcome in self._run_board(request, metas, sized, deadline):
                if isinstance(outcome, ExpertMeshError):
                    failures[index] = outcome
                else:
                    yield outcome
        finally:
            self._release(factory, num)
        failed = board_outcome(num, failures)
        if failed is not None:
            self._end_stream(grpc_context, failed)

    def _check_board(self, request: pb.InspectBoardRequest) -> list[dict]:
        """Every field of the board and its components checked before anything runs; each component's fields."""
        check_board(request.board_id, request.factory_id, request.station_id,
                    [BoardComponent(c.request_id, c.factory_id, c.station_id, c.component_hint, len(c.image))
                     for c in request.components], self.board_limits, self.spec.image.max_bytes)
        return [_request_fields(c.request_id, c.factory_id or request.factory_id, c.station_id or request.station_id,
                                c.component_hint, c.metadata, self.limits, prefix=f"components[{i}].")
                for i, c in enumerate(request.components)]

    async def _decode_board(self, request: pb.InspectBoardRequest) -> list[dict[int, np.ndarray]]:
        """Every component decoded (on the decode threads) before the first result streams; the first component (by
        index) that does not decode refuses the board, naming it."""
        outcomes = await asyncio.gather(*(self._decode(c.image, field=f"components[{i}].image")
                                          for i, c in enumerate(request.components)), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    async def _run_board(self, request: pb.InspectBoardRequest, metas: list[dict], sized: list[dict[int, np.ndarray]],
                         deadline: Deadline):
        """Yield (index, response or error) as components complete, keeping at most `max_in_flight` running. When
        the stream is closed early (the client cancelled, or its deadline passed), the components still running are
        cancelled (and with them their router calls, when no other request shares the batch): nothing keeps working
        for a client that is gone."""
        queued = iter(range(len(metas)))
        running: set[asyncio.Task] = set()
        try:
            while True:
                while len(running) < self.board_limits.max_in_flight and (index := next(queued, None)) is not None:
                    running.add(asyncio.ensure_future(
                        self._board_component(request, index, metas[index], sized[index], deadline)))
                if not running:
                    return
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: t.result()[0]):
                    yield task.result()
        finally:
            for task in running:
                task.cancel()

    async def _board_component(self, request: pb.InspectBoardRequest, index: int, meta: dict,
                               sized: dict[int, np.ndarray], deadline: Deadline
                               ) -> tuple[int, pb.InspectResponse | ExpertMeshError]:
        """One component of a board: its response, or its error (never raised: the board decides how it ends)."""
        t0 = time.perf_counter()
        rid = request.components[index].request_id or f"{request.board_id}-{index}"
        try:
            result = await self._routed(sized, meta, deadline)
        except ExpertMeshError as err:
            failure = component_error(index, err)
        except Exception as exc:  # noqa: BLE001 - unexpected: INTERNAL for this component, the stack to the log
            failure = component_error(index, self._internal(exc, rid))
        else:
            self._record("grpc_board", request.factory_id, t0, "OK", result["verdict"], result.get("coe", ""))
            return index, to_proto(rid, result, request.board_id, index)
        self._record("grpc_board", request.factory_id, t0, failure.code.value)
        return index, failure

    # ------------------------------------------------------------------ HTTP
    async def _placement(self, http: Request) -> dict:
        """GET /v1/placement (any factory's token): the in-cluster placement controller's view."""
        self.tokens.factory_of(http.headers.get("authorization"))
        if http.method != "GET":
            raise InvalidArgument(f"method {http.method} not allowed", field="method", fix="use GET /v1/placement")
        if self.placement_controller is None:
            raise NotFound("this app runs no placement controller", field="path",
                           fix="serve with settings.placement_controller: true (the Helm chart does)")
        return await self.placement_controller.status.remote()

    async def __call__(self, http: Request) -> JSONResponse:
        rid, factory_id, t0 = "", "", time.perf_counter()
        try:
            path = http.scope["path"].rstrip("/")  # the raw path: Starlette's url.path drops tabs and newlines
            if path == "/v1/placement":
                return JSONResponse(await self._placement(http))
            if path != "/v1/inspect":
                raise NotFound(f"no route {path[:64]!r}{'...' if len(path) > 64 else ''}", field="path",
                               fix="POST /v1/inspect")
            if http.method != "POST":
                raise InvalidArgument(f"method {http.method} not allowed", field="method", fix="use POST /v1/inspect")
            self.tokens.factory_of(http.headers.get("authorization"))  # a token before any byte of the body is read
            body = await read_body(http, 2 * self.spec.image.max_bytes)  # base64 is 4/3 of the image, plus the JSON
            doc = parse_body(body)
            rid = echo_id(doc["request_id"])  # what errors echo: only a valid id, never the raw one
            factory_id = doc["factory_id"]
            rid, result = await self._inspect(http.headers.get("authorization"), doc["request_id"], factory_id,
                                              doc["station_id"], doc["image"], doc["component_hint"], doc["metadata"],
                                              http.headers.get(TIMEOUT_HEADER), doc["coe"])
            self._record("http", factory_id, t0, "OK", result["verdict"], result.get("coe", ""))
            return JSONResponse({"request_id": rid, **{k: result[k] for k in (
                "category", "category_confidence", "verdict", "defect", "latency_ms")},
                "coe_version": result.get("coe_version", ""),
                "experts": [t.wire() for t in result["trace"]]})
        except ExpertMeshError as err:
            self._record("http", factory_id, t0, err.code.value)
            return JSONResponse({"error": err.to_dict(), "request_id": rid}, status_code=err.http_status)
        except Exception as exc:  # noqa: BLE001
            err = self._internal(exc, rid)
            self._record("http", factory_id, t0, err.code.value)
            return JSONResponse({"error": err.to_dict(), "request_id": rid}, status_code=err.http_status)
