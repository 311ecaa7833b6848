"""A line-side inspection station: sends generated component images (and boards) over gRPC at a set rate.

Open loop: request i is sent at i / rate seconds whatever the server does, from a thread pool, so
a slow server shows up as latency and errors rather than as a slower client. Ground truth comes
from the generator, so the station also measures verdict accuracy. Bounded: it stops after
`duration_s` and waits at most `timeout_s` for what is in flight.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.preprocess import encode_png
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc


@dataclass
class StationReport:
    target: str
    duration_s: float
    num_sent: int = 0
    num_ok: int = 0
    num_components: int = 0
    throughput_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    verdict_accuracy: float = 0.0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    experts_hit: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"station -> {self.target}: {self.num_sent} requests in {self.duration_s:.1f} s, "
                 f"{self.num_components} components answered ({self.throughput_per_s:.1f} components/s)",
                 f"latency p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms; verdict accuracy {self.verdict_accuracy:.4f}",
                 "errors by code: " + (", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_code.items())) or "none"),
                 "expert hits: " + ", ".join(f"{k} {v}" for k, v in sorted(self.experts_hit.items(), key=lambda kv: -kv[1]))]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def sample_pairs(n: int, seed: int, defect_rate: float, mix: dict[str, float] | None = None) -> list[tuple[str, str, int]]:
    """n (component, defect, image index) drawn from the category mix (default uniform) with the given defect rate."""
    rng = np.random.default_rng(seed)
    comps = list(generator.COMPONENTS)
    p = np.array([(mix or {}).get(c, 1.0) for c in comps], dtype=float)
    out = []
    for i in range(n):
        comp = comps[int(rng.choice(len(comps), p=p / p.sum()))]
        defects = [d for d in generator.defects_for(comp) if d != "ok"]
        defect = defects[int(rng.integers(len(defects)))] if rng.random() < defect_rate else "ok"
        out.append((comp, defect, i))
    return out


def sample_components(n: int, seed: int, defect_rate: float, mix: dict[str, float] | None = None) -> list[tuple[str, str, bytes]]:
    """n (component, defect, png) drawn from the category mix (default uniform) with the given defect rate."""
    return [(c, d, encode_png(generator.generate(c, d, seed, i))) for c, d, i in sample_pairs(n, seed, defect_rate, mix)]


def trace_record(resp: pb.InspectResponse) -> dict:
    """One response as a JSON-able trace record (what `--traces` writes and the profiler reads)."""
    return {"request_id": resp.request_id, "category": resp.category, "verdict": pb.Verdict.Name(resp.verdict),
            "defect": resp.defect, "latency_ms": resp.latency_ms,
            "experts": [{"expert": t.expert, "label": t.label, "score": t.score, "latency_ms": t.latency_ms,
                         "reason": t.reason, "because_of": t.because_of, "node_id": t.node_id} for t in resp.experts]}


def run_station(target: str, token: str, factory_id: str, *, rate_per_s: float, duration_s: float, station_id: str = "station-1",
                board_fraction: float = 0.1, board_size: int = 6, defect_rate: float = 0.3, seed: int = 7,
                mix: dict[str, float] | None = None, timeout_s: float = 30.0, progress: bool = True,
                traces_path: Path | None = None) -> StationReport:
    pool = sample_components(256, seed, defect_rate, mix)
    traces = open(traces_path, "w") if traces_path else None  # noqa: SIM115 - closed below
    rng = np.random.default_rng(seed + 1)
    lock = threading.Lock()
    latencies: list[float] = []
    correct = answered = sent = 0
    errors: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    metadata = (("authorization", f"Bearer {token}"),)

    def record(resp: pb.InspectResponse, defect: str) -> None:
        nonlocal correct, answered
        with lock:
            answered += 1
            correct += (resp.verdict == pb.PASS) == (defect == "ok") and resp.verdict != pb.UNCERTAIN
            hits.update(t.expert for t in resp.experts)
            if traces is not None:
                traces.write(json.dumps(trace_record(resp)) + "\n")

    def send(i: int, board: bool, stub: pb_grpc.InspectionServiceStub) -> None:
        t0 = time.perf_counter()
        try:
            if board:
                picks = [pool[(i * board_size + k) % len(pool)] for k in range(board_size)]
                req = pb.InspectBoardRequest(board_id=f"{station_id}-board-{i}", factory_id=factory_id, station_id=station_id,
                                             components=[pb.InspectRequest(image=img) for _, _, img in picks])
                for resp in stub.InspectBoard(req, metadata=metadata, timeout=timeout_s):
                    record(resp, picks[resp.component_index][1])
            else:
                comp, defect, img = pool[i % len(pool)]
                record(stub.Inspect(pb.InspectRequest(request_id=f"{station_id}-{i}", factory_id=factory_id,
                                                      station_id=station_id, image=img), metadata=metadata, timeout=timeout_s), defect)
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000.0)
        except grpc.RpcError as err:
            with lock:
                errors[err.code().name] += 1

    start = time.perf_counter()
    next_report = start + 5.0
    with grpc.insecure_channel(target) as channel, ThreadPoolExecutor(max_workers=64) as ex:
        stub = pb_grpc.InspectionServiceStub(channel)
        i = 0
        while (now := time.perf_counter()) - start < duration_s:
            due = start + i / rate_per_s
            if due > now:
                time.sleep(min(due - now, 0.05))
                continue
            ex.submit(send, i, bool(rng.random() < board_fraction), stub)
            i += 1
            sent = i
            if progress and now >= next_report:
                with lock:
                    print(f"  {now - start:5.1f} s: sent {sent}, answered {answered}, errors {sum(errors.values())}", flush=True)
                next_report += 5.0
    elapsed = time.perf_counter() - start
    if traces is not None:
        traces.close()
    lat = np.array(latencies) if latencies else np.array([0.0])
    return StationReport(target=target, duration_s=elapsed, num_sent=sent, num_ok=len(latencies), num_components=answered,
                         throughput_per_s=answered / elapsed, p50_ms=float(np.percentile(lat, 50)),
                         p99_ms=float(np.percentile(lat, 99)), verdict_accuracy=correct / max(answered, 1),
                         errors_by_code=dict(errors), experts_hit=dict(hits))
