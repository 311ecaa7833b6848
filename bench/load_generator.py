"""The benchmark's open-loop load generator: grpc.aio on one channel, in a process of its own.

Request i of a point is sent at i / rate seconds after the point's start whatever the server does (a slow server
shows as latency and errors, never as a slower client), each with its own deadline. Every request is recorded with
its latency (a board's: to the end of its stream) and its final status code. The generator runs in a separate
process (`LoadGenerator`), so the driver's Ray threads never share its GIL; it prints a progress line every few
seconds.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import grpc

from expertmesh.bench.throughput_sweep import OK, RequestRecord, send_offsets_s
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc

SINGLE = "single"
BOARD = "board"
PROGRESS_EVERY_S = 5.0
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]

_worker: dict = {}  # the generator process's requests, set once by `_init_worker`


def _init_worker(target: str, token: str, factory_id: str, images: list[bytes], board_size: int) -> None:
    """Build every request once: the pool's singles, and boards of `board_size` consecutive pool images."""
    singles = [pb.InspectRequest(factory_id=factory_id, station_id="bench", image=img) for img in images]
    boards = [pb.InspectBoardRequest(board_id=f"bench-board-{b}", factory_id=factory_id, station_id="bench",
                                     components=[pb.InspectRequest(image=images[(b * board_size + k) % len(images)])
                                                 for k in range(board_size)])
              for b in range(max(1, len(images) // board_size))]
    _worker.update(target=target, metadata=(("authorization", f"Bearer {token}"),), singles=singles, boards=boards)


def run_point(kind: str, rate_per_s: float, num_requests: int, deadline_s: float, label: str) -> list[RequestRecord]:
    """One open-loop point (in the generator process): `num_requests` of `kind` at `rate_per_s`."""
    return asyncio.run(_run_point(kind, rate_per_s, num_requests, deadline_s, label))


async def _run_point(kind: str, rate_per_s: float, num_requests: int, deadline_s: float,
                     label: str) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    offsets = send_offsets_s(num_requests, rate_per_s)
    async with grpc.aio.insecure_channel(_worker["target"], options=_CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.InspectionServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), timeout=30.0)
        start = time.perf_counter()
        reporter = asyncio.create_task(_report_progress(label, start, num_requests, records))
        tasks = []
        for i, offset in enumerate(offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(stub, kind, i, start, deadline_s, records)))
        await asyncio.gather(*tasks)
        reporter.cancel()
    return records


async def _one(stub: pb_grpc.InspectionServiceStub, kind: str, i: int, start: float, deadline_s: float,
               records: list[RequestRecord]) -> None:
    metadata = _worker["metadata"]
    t0 = time.perf_counter()
    answered, code = 0, OK
    try:
        if kind == BOARD:
            boards = _worker["boards"]
            async for _ in stub.InspectBoard(boards[i % len(boards)], metadata=metadata, timeout=deadline_s):
                answered += 1
        else:
            singles = _worker["singles"]
            await stub.Inspect(singles[i % len(singles)], metadata=metadata, timeout=deadline_s)
            answered = 1
    except grpc.aio.AioRpcError as err:
        code = err.code().name
    records.append(RequestRecord(sent_s=t0 - start, latency_ms=(time.perf_counter() - t0) * 1000.0, code=code,
                                 num_components=answered))


async def _report_progress(label: str, start: float, num_requests: int, records: list[RequestRecord]) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        errors = sum(r.code != OK for r in records)
        print(f"    {label}: {time.perf_counter() - start:5.1f} s, {len(records)}/{num_requests} answered, "
              f"{errors} errors", flush=True)


class LoadGenerator:
    """A generator process for one target; `point` runs one open-loop point there and returns its records."""

    def __init__(self, target: str, token: str, factory_id: str, images: list[bytes], board_size: int) -> None:
        self.target = target
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker,
                                         initargs=(target, token, factory_id, images, board_size))

    def point(self, kind: str, rate_per_s: float, num_requests: int, deadline_s: float,
              label: str) -> list[RequestRecord]:
        return self._pool.submit(run_point, kind, rate_per_s, num_requests, deadline_s, label).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
