"""`expertmesh bench throughput`, the run: the offline bound, the no-op Serve app and ExpertMesh (single Inspect and
boards) swept open-loop on one machine, overload at a multiple of capacity, time to ready and resident memory.

`run_throughput` starts its own loopback Ray node, deploys the no-op app, sweeps it, deletes it, then deploys
ExpertMesh with `runner.start` and sweeps that; given an existing gRPC target (and its token) it starts nothing and
sweeps only ExpertMesh (what the integration test does).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.bench.provenance import provenance
from expertmesh.bench.load_generator import BOARD, SINGLE, LoadGenerator
from expertmesh.bench.offline_bound import offline_bound
from expertmesh.bench.serving_under_test import (FACTORY_ID, RayNode, bench_tokens, delete_noop, deploy_expertmesh,
                                                 deploy_noop, expertmesh_rss, grpc_target, node_num_cpus,
                                                 serve_settings, stop_expertmesh, weights_bytes)
from expertmesh.bench.throughput_sweep import (PointResult, SweepRule, capacity, next_rate, num_requests_for,
                                               overload_figures, summarize_point)
from expertmesh.bench.throughput_table import sweep_summary
from expertmesh.deployments.config import AppArgs
from expertmesh.experts.spec import CoESpec
from expertmesh.station import sample_components

PARTS = ("offline", "noop", "single", "board", "overload")


class ThroughputSettings(BaseModel):
    """Every knob of a run (recorded in its JSON). `quick()` is the short version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    point_s: float = Field(5.0, gt=0, description="seconds of sending per sweep point (at least the minimum count)")
    min_singles: int = Field(200, ge=1, description="requests per single-Inspect point, at least (for a p99)")
    min_boards: int = Field(10, ge=1, description="boards per board point, at least")
    board_size: int = Field(50, ge=1, description="components per board")
    deadline_s: float = Field(30.0, gt=0, description="per-request gRPC deadline")
    noop_start_per_s: float = Field(50.0, gt=0)
    single_start_per_s: float = Field(10.0, gt=0)
    board_start_per_s: float = Field(0.2, gt=0, description="boards per second")
    single_target_p99_ms: float = Field(250.0, gt=0)
    board_target_p99_ms: float = Field(1000.0, gt=0)
    max_ramp_points: int = Field(9, ge=1)
    max_fill_points: int = Field(2, ge=0)
    overload_factor: float = Field(3.0, gt=1, description="overload is offered at this many times the capacity")
    pool_size: int = Field(256, ge=1, description="generated components the requests cycle through")
    offline_components: int = Field(1024, ge=1)
    offline_repeats: int = Field(3, ge=1)
    settle_s: float = Field(3.0, ge=0, description="pause after each overload point, for queues to drain")
    seed: int = 7
    defect_rate: float = Field(0.3, ge=0, le=1)
    parts: tuple[str, ...] = PARTS

    @classmethod
    def quick(cls, **overrides) -> ThroughputSettings:
        return cls(**{"point_s": 2.0, "min_singles": 60, "min_boards": 4, "max_ramp_points": 6, "max_fill_points": 1,
                      "offline_components": 256, "offline_repeats": 1, "pool_size": 100, "settle_s": 1.0,
                      **overrides})

    def rule(self, kind: str, start_per_s: float) -> SweepRule:
        target = self.board_target_p99_ms if kind == BOARD else self.single_target_p99_ms
        return SweepRule(start_per_s=start_per_s, target_p99_ms=target, max_ramp_points=self.max_ramp_points,
                         max_fill_points=self.max_fill_points)


def say(line: str) -> None:
    print(line, flush=True)


def run_sweep(gen: LoadGenerator, name: str, kind: str, rule: SweepRule, s: ThroughputSettings) -> list[PointResult]:
    """An adaptive open-loop sweep (`next_rate`), one point after the other; a line per point."""
    points: list[PointResult] = []
    while (rate := next_rate(points, rule)) is not None:
        points.append(run_point(gen, name, kind, rate, s))
    return points


def run_point(gen: LoadGenerator, name: str, kind: str, rate_per_s: float, s: ThroughputSettings) -> PointResult:
    n = num_requests_for(rate_per_s, s.point_s, s.min_boards if kind == BOARD else s.min_singles)
    say(f"  {name} at {rate_per_s:.3g}/s: {n} {'boards' if kind == BOARD else 'requests'} ...")
    p = summarize_point(gen.point(kind, rate_per_s, n, s.deadline_s, f"{name} {rate_per_s:.3g}/s"), rate_per_s)
    p99 = "-" if p.p99_ms is None else f"{p.p99_ms:.0f}"
    p50 = "-" if p.p50_ms is None else f"{p.p50_ms:.0f}"
    say(f"  {name} at {rate_per_s:.3g}/s: achieved {p.achieved_per_s:.3g}/s ({p.achieved_components_per_s:.1f} "
        f"components/s), p50 {p50} ms, p99 {p99} ms, errors {p.errors_by_code or 'none'}")
    return p


def run_overload(gen: LoadGenerator, name: str, kind: str, points: list[PointResult],
                 s: ThroughputSettings) -> dict | None:
    cap = capacity(points)
    if cap is None or cap.achieved_per_s <= 0:
        return None
    rate = s.overload_factor * cap.achieved_per_s
    point = run_point(gen, f"{name} overload", kind, rate, s)
    time.sleep(s.settle_s)
    return {**overload_figures(point, cap), "point": point.to_dict()}


def sweep_serving(target: str, token: str, images: list[bytes], s: ThroughputSettings,
                  on_swept: Callable[[], None] = lambda: None, factory_id: str = FACTORY_ID) -> dict:
    """Parts (c), (d) and the overloads against ExpertMesh at `target`; `on_swept` runs between sweeps and overload."""
    out: dict = {}
    points: dict[str, list[PointResult]] = {}
    with LoadGenerator(target, token, factory_id, images, s.board_size) as gen:
        for kind, start in ((SINGLE, s.single_start_per_s), (BOARD, s.board_start_per_s)):
            if kind in s.parts:
                say(f"ExpertMesh {kind} sweep (target p99 {s.rule(kind, start).target_p99_ms:g} ms)")
                rule = s.rule(kind, start)
                points[kind] = run_sweep(gen, kind, kind, rule, s)
                out[kind] = sweep_summary(points[kind], rule, s.board_size if kind == BOARD else 1)
        on_swept()
        if "overload" in s.parts:
            out["overload"] = {kind: run_overload(gen, kind, kind, p, s) for kind, p in points.items()}
    return out


def run_throughput(s: ThroughputSettings, spec: CoESpec, zoo: Path, profile: Path | None, spec_path: str | None = None,
                   target: str | None = None, token: str | None = None, factory_id: str = FACTORY_ID) -> dict:
    """The whole benchmark (see the module doc); returns the results document (`write_results` writes it)."""
    result: dict = {"benchmark": "throughput", **provenance(), "settings": s.model_dump(mode="json")}
    offline = "offline" in s.parts and target is None
    num_images = max(s.pool_size, s.offline_components if offline else 0)
    say(f"generating {num_images} components ...")
    pngs = [part.image for part in sample_components(num_images, s.seed, s.defect_rate)]
    images = pngs[:s.pool_size]
    if offline:
        say(f"offline bound: {s.offline_components} components, {s.offline_repeats} timed runs ...")
        result["offline"] = offline_bound(spec, zoo, pngs[:s.offline_components], s.offline_repeats)
        say(f"  offline bound: {result['offline']['components_per_s']:.1f} components/s")
    result["memory"] = {"weights_bytes": weights_bytes(spec, zoo)}
    if target is not None:
        if token is None:
            raise ValueError("an existing target needs the token of `factory_id` there (token=)")
        result.update(sweep_serving(target, token, images, s, factory_id=factory_id))
        return result
    with tempfile.TemporaryDirectory(prefix="em-bench-") as workdir:
        tokens_file, token = bench_tokens(Path(workdir))
        settings = serve_settings()
        args = AppArgs(spec=spec_path, zoo=str(zoo), tokens_file=str(tokens_file),
                       profile=str(profile) if profile else None, settings=settings)
        say("starting Ray (one loopback node) ...")
        node = RayNode.start(node_num_cpus(args))
        startup = {"ray_start_s": node.start_s}
        say(f"  Ray up in {node.start_s:.1f} s at {node.address}")
        try:
            if "noop" in s.parts:
                result["noop"] = run_noop(node, settings, token, images, s, startup)
            say("deploying ExpertMesh (runner.start) ...")
            startup.update(deploy_expertmesh(args, node.address, token, images[0]))
            result["startup"] = startup
            say(f"  ExpertMesh deployed in {startup['deploy_s']:.1f} s, answering in {startup['ready_s']:.1f} s")
            result["memory"]["at_ready"] = expertmesh_rss(descendants_of=node.process.pid)

            def after_sweeps() -> None:
                result["memory"]["after_load"] = expertmesh_rss(descendants_of=node.process.pid)
            try:
                result.update(sweep_serving(grpc_target(settings), token, images, s, on_swept=after_sweeps))
            finally:
                stop_expertmesh()
        finally:
            node.stop()
    result["machine"]["load_average_1_5_15m_at_end"] = list(os.getloadavg())  # this machine may be shared
    return result


def run_noop(node: RayNode, settings, token: str, images: list[bytes], s: ThroughputSettings, startup: dict) -> dict:
    say("deploying the no-op Serve gRPC app ...")
    startup["noop_deploy_s"] = deploy_noop(node.address, settings)
    try:
        rule = s.rule(SINGLE, s.noop_start_per_s)
        say(f"no-op sweep (target p99 {rule.target_p99_ms:g} ms)")
        with LoadGenerator(grpc_target(settings), token, FACTORY_ID, images, s.board_size) as gen:
            points = run_sweep(gen, "no-op", SINGLE, rule, s)
        return sweep_summary(points, rule, 1)
    finally:
        delete_noop()
