"""`expertmesh bench isolation`: does one factory's flood hurt another factory? Quotas and fair queuing, measured.

One loopback Ray node serves the default CoE (`runner.start`, as `expertmesh serve` does) with a tokens file of two
factories, `quiet` and `flood`. Clients know only the wire contract (gRPC Inspect, bearer token, the
`x-expertmesh-timeout-seconds` metadata). The quiet factory sends open-loop at `quiet_rate_per_s` in every phase:
1. `quiet alone`: the flood factory sends nothing (the baseline);
2. `flood, no quotas`: the flood factory runs `flood_clients` closed-loop clients, the tokens file has no quotas;
3. `flood, quotas`: the same flood, after the tokens file is rewritten with the flood factory's quota (the ingress
   reads the file again within 2 s: no restart); a refused flood client backs off exponentially
   (`flood_backoff_s` doubling to `flood_backoff_max_s`, reset by an answer), as a gRPC client's retry policy does;
4. `quiet alone again`: the baseline once more, to see the machine's drift.
The target (the hardening issue): with quotas, the quiet factory's p50 stays within 2x of its p50 alone. Writes
PREFIX.json (commit, machine, settings, each phase's figures), PREFIX.md and PREFIX.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml
from pydantic import BaseModel, ConfigDict, Field

from expertmesh.bench.provenance import provenance
from expertmesh.bench.serving_under_test import (FACTORY_ID, RayNode, deploy_expertmesh, grpc_target,
                                                 node_num_cpus, serve_settings, stop_expertmesh)
from expertmesh.deployments.auth import write_dev_tokens
from expertmesh.deployments.config import AppArgs
from expertmesh.station import sample_components
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc

QUIET, FLOOD = "quiet", "flood"
PHASES = ("quiet alone", "flood, no quotas", "flood, quotas", "quiet alone again")
TARGET_RATIO = 2.0


class IsolationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    phase_s: float = Field(30.0, gt=0, description="seconds measured per phase")
    warmup_s: float = Field(5.0, ge=0, description="seconds of load before each phase is measured")
    quiet_rate_per_s: float = Field(5.0, gt=0, description="the quiet factory's open-loop rate")
    flood_clients: int = Field(32, ge=1, description="the flood factory's concurrent closed-loop clients")
    flood_rate_per_s: float = Field(4.0, gt=0, description="the flood factory's rate quota (phase 3)")
    flood_max_in_flight: int = Field(4, ge=1, description="the flood factory's concurrency quota (phase 3)")
    flood_backoff_s: float = Field(0.05, gt=0, description="a refused flood client's first pause")
    flood_backoff_max_s: float = Field(1.0, gt=0, description="the longest pause it grows to")
    deadline_s: float = Field(30.0, gt=0, description="every request's deadline (gRPC and the metadata)")
    pool_size: int = Field(64, ge=1, description="distinct component images sent")
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> IsolationSettings:
        return cls(**{"phase_s": 8.0, "warmup_s": 2.0, "flood_clients": 16, **overrides})


def say(line: str) -> None:
    print(line, flush=True)


def write_tokens(path: Path, tokens: dict[str, str], quota: dict | None) -> None:
    """The tokens file: flat without quotas; `tokens:` + `quotas:` with the flood factory's quota."""
    flat = {t: f for f, t in tokens.items()}
    doc = {"tokens": flat, "quotas": {FLOOD: quota}} if quota else flat
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)  # atomic: the ingress never reads half a file


class Tally:
    """Per factory: latencies of answered requests in the measured window, and codes of all."""

    def __init__(self) -> None:
        self.latency_ms: dict[str, list[float]] = {QUIET: [], FLOOD: []}
        self.codes: dict[str, dict[str, int]] = {QUIET: {}, FLOOD: {}}
        self.measuring = False

    def record(self, factory: str, code: str, latency_ms: float) -> None:
        if not self.measuring:
            return
        self.codes[factory][code] = self.codes[factory].get(code, 0) + 1
        if code == "OK":
            self.latency_ms[factory].append(latency_ms)


async def _inspect(stub, factory: str, token: str, image: bytes, deadline_s: float, tally: Tally) -> str:
    t0 = time.perf_counter()
    try:
        await stub.Inspect(pb.InspectRequest(factory_id=factory, station_id=f"{factory}-station", image=image),
                           metadata=(("authorization", f"Bearer {token}"), ("x-expertmesh-timeout-seconds", f"{deadline_s:g}")),
                           timeout=deadline_s)
        code = "OK"
    except grpc.aio.AioRpcError as err:
        code = err.code().name
    tally.record(factory, code, (time.perf_counter() - t0) * 1000.0)
    return code


async def _quiet(stub, token: str, images: list[bytes], s: IsolationSettings, tally: Tally, stop: asyncio.Event) -> None:
    """Open loop: a request every 1/rate seconds (Poisson), whatever the answers do."""
    rng, pending, i = random.Random(s.seed), set(), 0
    while not stop.is_set():
        pending.add(asyncio.ensure_future(_inspect(stub, QUIET, token, images[i % len(images)], s.deadline_s, tally)))
        pending = {p for p in pending if not p.done()}
        i += 1
        try:
            await asyncio.wait_for(stop.wait(), rng.expovariate(s.quiet_rate_per_s))
        except asyncio.TimeoutError:
            pass
    await asyncio.gather(*pending)


async def _flood_client(stub, token: str, images: list[bytes], s: IsolationSettings, tally: Tally,
                        stop: asyncio.Event, k: int) -> None:
    pause_s, i = s.flood_backoff_s, k
    while not stop.is_set():
        code = await _inspect(stub, FLOOD, token, images[i % len(images)], s.deadline_s, tally)
        i += s.flood_clients
        if code == "RESOURCE_EXHAUSTED":
            await asyncio.sleep(pause_s * random.uniform(0.5, 1.0))  # jittered, as gRPC's retry backoff
            pause_s = min(s.flood_backoff_max_s, pause_s * 2)
        else:
            pause_s = s.flood_backoff_s


async def _phase(target: str, tokens: dict[str, str], images: list[bytes], s: IsolationSettings, flood: bool) -> dict:
    tally, stop = Tally(), asyncio.Event()
    async with grpc.aio.insecure_channel(target) as quiet_ch, grpc.aio.insecure_channel(target) as flood_ch:
        quiet_stub, flood_stub = pb_grpc.InspectionServiceStub(quiet_ch), pb_grpc.InspectionServiceStub(flood_ch)
        tasks = [asyncio.ensure_future(_quiet(quiet_stub, tokens[QUIET], images, s, tally, stop))]
        if flood:
            tasks += [asyncio.ensure_future(_flood_client(flood_stub, tokens[FLOOD], images, s, tally, stop, k))
                      for k in range(s.flood_clients)]
        await asyncio.sleep(s.warmup_s)
        tally.measuring, t0 = True, time.perf_counter()
        await asyncio.sleep(s.phase_s)
        tally.measuring, measured_s = False, time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*tasks)
    return summary(tally, measured_s)


def summary(tally: Tally, measured_s: float) -> dict:
    out = {"measured_s": measured_s}
    for factory in (QUIET, FLOOD):
        lat = sorted(tally.latency_ms[factory])
        sent = sum(tally.codes[factory].values())
        out[factory] = {"sent": sent, "offered_per_s": sent / measured_s, "answered_per_s": len(lat) / measured_s,
                        "codes": dict(sorted(tally.codes[factory].items())),
                        "p50_ms": statistics.median(lat) if lat else None,
                        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None}
    return out


def run_isolation(s: IsolationSettings, zoo: Path, spec_path: str | None = None) -> dict:
    doc: dict = {"benchmark": "isolation", **provenance(), "settings": s.model_dump(mode="json")}
    images = [part.image for part in sample_components(s.pool_size, s.seed, 0.3)]
    quota = {"rate_per_s": s.flood_rate_per_s, "max_in_flight": s.flood_max_in_flight}
    with tempfile.TemporaryDirectory(prefix="em-isolation-") as workdir:
        tokens_file = Path(workdir) / "tokens.yaml"
        tokens = write_dev_tokens(tokens_file, [QUIET, FLOOD, FACTORY_ID])  # FACTORY_ID: the readiness check's
        settings = serve_settings()
        args = AppArgs(spec=spec_path, zoo=str(zoo), tokens_file=str(tokens_file), settings=settings)
        say("starting Ray (one loopback node) and deploying ExpertMesh ...")
        node = RayNode.start(node_num_cpus(args))
        try:
            write_tokens(tokens_file, tokens, None)
            deploy_expertmesh(args, node.address, tokens[FACTORY_ID], images[0])
            target = grpc_target(settings)
            phases = {}
            for name in PHASES:
                with_quota = name == "flood, quotas"
                write_tokens(tokens_file, tokens, quota if with_quota else None)
                if with_quota:
                    time.sleep(3.0)  # the ingress looks at the file at most every 2 s
                say(f"phase {name!r}: {s.warmup_s:g} s warm-up + {s.phase_s:g} s ...")
                phases[name] = asyncio.run(_phase(target, tokens, images, s, flood=name.startswith("flood")))
                q = phases[name][QUIET]
                say(f"  quiet p50 {q['p50_ms']} ms, p99 {q['p99_ms']} ms; flood {phases[name][FLOOD]['codes']}")
            doc["phases"] = phases
        finally:
            stop_expertmesh()
            node.stop()
    base = doc["phases"]["quiet alone"][QUIET]["p50_ms"]
    doc["ratios"] = {name: (p[QUIET]["p50_ms"] / base if base and p[QUIET]["p50_ms"] else None)
                     for name, p in doc["phases"].items()}
    doc["target_ratio"] = TARGET_RATIO
    doc["met"] = (doc["ratios"]["flood, quotas"] or float("inf")) <= TARGET_RATIO
    return doc


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"# Factory isolation ({(doc.get('commit') or '?')[:10]}, {doc['machine']['cpu_count']} CPUs)", "",
             f"Quiet factory open-loop at {s['quiet_rate_per_s']:g}/s; flood factory {s['flood_clients']} closed-loop "
             f"clients (refused: backoff {s['flood_backoff_s']:g} s doubling to {s['flood_backoff_max_s']:g} s); "
             f"quota for the flood: {s['flood_rate_per_s']:g}/s, {s['flood_max_in_flight']} in flight. "
             f"{s['phase_s']:g} s per phase after {s['warmup_s']:g} s warm-up.", "",
             "| phase | quiet p50 ms | quiet p99 ms | quiet p50 / alone | quiet codes | flood offered/s | "
             "flood answered/s | flood codes |", "|---|--:|--:|--:|---|--:|--:|---|"]
    fmt = lambda v, f="{:.0f}": "-" if v is None else f.format(v)  # noqa: E731
    for name, p in doc["phases"].items():
        q, f = p[QUIET], p[FLOOD]
        codes = lambda c: ", ".join(f"{k} {v}" for k, v in c.items()) or "-"  # noqa: E731
        lines.append(f"| {name} | {fmt(q['p50_ms'])} | {fmt(q['p99_ms'])} | {fmt(doc['ratios'][name], '{:.2f}x')} | "
                     f"{codes(q['codes'])} | {fmt(f['offered_per_s'], '{:.1f}')} | "
                     f"{fmt(f['answered_per_s'], '{:.1f}')} | {codes(f['codes'])} |")
    verdict = "met" if doc["met"] else "NOT met"
    lines += ["", f"Target: with quotas, quiet p50 within {doc['target_ratio']:g}x of alone: **{verdict}**.", ""]
    return "\n".join(lines)


def plot(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["phases"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(len(names))
    for offset, key, color in ((-0.2, "p50_ms", "tab:blue"), (0.2, "p99_ms", "tab:orange")):
        ax.bar([i + offset for i in x], [doc["phases"][n][QUIET][key] or 0 for n in names], width=0.4,
               color=color, label=f"quiet factory {key[:3]}")
    base = doc["phases"]["quiet alone"][QUIET]["p50_ms"]
    if base:
        ax.axhline(base * doc["target_ratio"], color="black", linestyle=":", label="target: 2x p50 alone")
    ax.set_xticks(list(x), names)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms")
    ax.legend(fontsize=8)
    ax.set_title(f"expertmesh bench isolation - {(doc.get('commit') or '?')[:10]}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def cmd_bench_isolation(args: argparse.Namespace) -> int:
    from expertmesh.cli_options import spec_and_zoo

    out = Path(args.out)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
    else:
        _, zoo = spec_and_zoo(args)
        doc = run_isolation(IsolationSettings.quick() if args.quick else IsolationSettings(), zoo, args.spec)
        doc["command"] = "expertmesh " + " ".join(sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    plot(doc, out.with_suffix(".png"))
    print(markdown(doc))
    for ext in (".json", ".md", ".png"):
        print(f"wrote {out.with_suffix(ext)}")
    return 0
