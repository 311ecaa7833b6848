"""Driving one deployed system of the memory benchmark: warm-up, a closed loop, an open-loop sweep; every answer kept.

A request is one component or a board of many (`WorkloadRequest.parts`); each component's labels are kept under its
part id and checked against the all-resident run's at the end. Closed loop: each station sends its next request when
the previous one was answered. Open loop: fixed rates from half the closed-loop throughput, doubling, then filling in
(the throughput bench's adaptive sweep), for the highest rate whose p99 holds the bound. Progress every few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from expertmesh.bench.memory_systems import DeployedSystem
from expertmesh.bench.memory_table import closed_summary
from expertmesh.bench.memory_workload_requests import WorkloadRequest
from expertmesh.bench.throughput_sweep import (DEADLINE, OK, RequestRecord, SweepRule, next_rate, num_requests_for,
                                               send_offsets_s, summarize_point)
from expertmesh.bench.throughput_table import sweep_summary

PROGRESS_EVERY_S = 5.0
Answers = dict[str, dict[str, str]]  # part id -> expert -> label
Say = Callable[[str], None]


async def one(system: DeployedSystem, images: Mapping[str, Mapping[int, np.ndarray]], req: WorkloadRequest,
              start: float, deadline_s: float, records: list[RequestRecord], answers: Answers,
              inconsistent: list[str]) -> None:
    t0 = time.perf_counter()
    code = OK
    try:
        labels = await asyncio.wait_for(system.send(req, images[str(req.request_id)]), deadline_s)
        for part, got in labels.items():
            if part in answers and answers[part] != got:
                inconsistent.append(part)
            answers.setdefault(part, got)
    except asyncio.TimeoutError:
        code = DEADLINE
    except Exception as exc:  # noqa: BLE001 - a failed request is a result (its error's name), not the end of the run
        code = type(exc).__name__
    records.append(RequestRecord(sent_s=t0 - start, latency_ms=(time.perf_counter() - t0) * 1000.0, code=code,
                                 num_components=len(req.parts) if code == OK else 0))


async def _report(say: Say, label: str, start: float, total: int, records: list[RequestRecord]) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        errors = sum(r.code != OK for r in records)
        say(f"    {label}: {time.perf_counter() - start:5.1f} s, {len(records)}/{total} answered, {errors} errors")


async def closed_loop(system: DeployedSystem, images, requests: Sequence[WorkloadRequest], deadline_s: float,
                      answers: Answers, inconsistent: list[str], label: str, say: Say) -> list[RequestRecord]:
    """Each station sends its requests one after the other, the next when the previous one was answered."""
    by_station: dict[str, list[WorkloadRequest]] = {}
    for req in requests:
        by_station.setdefault(str(req.station), []).append(req)
    records: list[RequestRecord] = []
    start = time.perf_counter()

    async def station(reqs: list[WorkloadRequest]) -> None:
        for req in reqs:
            await one(system, images, req, start, deadline_s, records, answers, inconsistent)

    reporter = asyncio.create_task(_report(say, label, start, len(requests), records))
    try:
        await asyncio.gather(*(station(reqs) for reqs in by_station.values()))
    finally:
        reporter.cancel()
    return records


async def open_point(system: DeployedSystem, images, requests: Sequence[WorkloadRequest], rate_per_s: float,
                     deadline_s: float, answers: Answers, inconsistent: list[str], label: str,
                     say: Say) -> list[RequestRecord]:
    """Request i is sent i / rate seconds after the start, whatever the system does."""
    records: list[RequestRecord] = []
    start = time.perf_counter()
    reporter = asyncio.create_task(_report(say, label, start, len(requests), records))
    tasks = []
    try:
        for req, offset in zip(requests, send_offsets_s(len(requests), rate_per_s)):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(system, images, req, start, deadline_s, records, answers,
                                                 inconsistent)))
        await asyncio.gather(*tasks)
    finally:
        reporter.cancel()
    return records


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


async def measure(system: DeployedSystem, images, requests: Sequence[WorkloadRequest], *, warmup: int, closed: int,
                  num_stations: int, parts: Sequence[str], target_p99_ms: float, sweep: dict, deadline_s: float,
                  answers: Answers, say: Say) -> dict:
    """Warm-up, closed loop, open-loop sweep (each as `parts` asks) on `requests` (the same for every system);
    `sweep`: start_fraction, point_s, min_requests, max_ramp_points, max_fill_points."""
    name = system.system.name
    out: dict = {}
    inconsistent: list[str] = []
    if warmup:
        say(f"  {name}: warm-up, {warmup} requests closed-loop ...")
        await closed_loop(system, images, requests[:warmup], deadline_s, answers, inconsistent, f"{name} warm-up", say)
    if "closed" in parts:
        await system.reset_stats()
        reqs = requests[warmup:warmup + closed]
        say(f"  {name}: closed loop, {len(reqs)} requests from {num_stations} stations ...")
        records = await closed_loop(system, images, reqs, deadline_s, answers, inconsistent, f"{name} closed", say)
        out["closed"] = {**closed_summary(records, num_stations), "stats": await system.stats()}
        c = out["closed"]
        say(f"  {name}: closed loop {_f(c['throughput_per_s'], '.2f')} req/s ({_f(c['components_per_s'], '.1f')} "
            f"components/s), p50 {_f(c['p50_ms'], '.0f')} ms, p99 {_f(c['p99_ms'], '.0f')} ms, switches "
            f"{c['stats'].get('switches')}, errors {c['errors_by_code'] or 'none'}")
    if "open" in parts:
        await system.reset_stats()
        base = (out.get("closed") or {}).get("throughput_per_s") or 2.0
        rule = SweepRule(start_per_s=float(f"{max(base * sweep['start_fraction'], 0.1):.2g}"),
                         target_p99_ms=target_p99_ms, max_ramp_points=sweep["max_ramp_points"],
                         max_fill_points=sweep["max_fill_points"])
        cursor, points = warmup + closed, []
        while (rate := next_rate(points, rule)) is not None:
            n = num_requests_for(rate, sweep["point_s"], sweep["min_requests"])
            reqs = [requests[(cursor + i) % len(requests)] for i in range(n)]
            say(f"  {name} open loop at {rate:.3g}/s: {n} requests ...")
            records = await open_point(system, images, reqs, rate, deadline_s, answers, inconsistent,
                                       f"{name} {rate:.3g}/s", say)
            cursor += n
            p = summarize_point(records, rate)
            say(f"  {name} at {rate:.3g}/s: achieved {p.achieved_per_s:.3g}/s, p50 {_f(p.p50_ms, '.0f')} ms, "
                f"p99 {_f(p.p99_ms, '.0f')} ms, errors {p.errors_by_code or 'none'}")
            points.append(p)
        out["open"] = {**sweep_summary(points, rule, 1), "stats": await system.stats()}
        say(f"  {name}: highest rate with p99 <= {target_p99_ms:g} ms: "
            f"{_f(out['open']['highest_rate_meeting_target_per_s'], '.3g')}/s, capacity "
            f"{_f(out['open']['capacity_per_s'], '.3g')}/s")
    out["num_inconsistent_answers"] = len(inconsistent)
    return out
