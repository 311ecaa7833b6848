"""`expertmesh serve` (glue over deployments/ and cluster/): start or join Ray, deploy the app, and optionally run a
station against it, a local Prometheus beside it and the placement controller over it.

It starts Ray and builds the app (torch, Ray Serve: tens of seconds to import on a small machine), so `cli.py`
imports this module only when `serve` runs.
"""

from __future__ import annotations

import argparse
import shutil
import time
import urllib.parse
from pathlib import Path

from expertmesh.cli_options import spec_and_zoo
from expertmesh.cluster.controller import PlacementController, plan_on_inventory
from expertmesh.cluster.local import read_state
from expertmesh.cluster.observed import UsageWatch
from expertmesh.cluster.prometheus import PrometheusServer, scrape_targets
from expertmesh.cluster.served import served_demand
from expertmesh.deployments import runner
from expertmesh.deployments.auth import TokenTable
from expertmesh.deployments.config import AppArgs
from expertmesh.deployments.dashboard import HIT_RATE_SINCE_START
from expertmesh.errors import FailedPrecondition, InvalidArgument
from expertmesh.experts.spec import CoESpec
from expertmesh.profiler.store import ProfileStore
from expertmesh.serve_options import app_args, tokens_file
from expertmesh.station import StationReport, load_images, run_station


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until a signal, --duration, or the end of the station run (--stop-after-station). Exit 1 when the
    station run failed (a request failed, or none was answered)."""
    spec, zoo_root = spec_and_zoo(args)
    args.address = cluster_address(args.address)
    tokens = tokens_file(args)
    app = app_args(args, zoo_root, tokens)
    if args.replan and not (args.address and app.placement):
        raise InvalidArgument("--replan needs a cluster and a plan", field="--replan",
                              fix="pass --address HOST:PORT and --plan FILE (expertmesh up; expertmesh plan --json FILE)")
    if getattr(args, "station_each", None) and not getattr(args, "station_images", None):
        raise InvalidArgument("--station-each scores your own images exactly, but no --station-images were given",
                              field="--station-each", fix="add --station-images FOLDER, or drop --station-each")
    print(f"starting Ray and Serve, deploying {spec.name!r} ({len(spec.experts)} experts) from {zoo_root} ...", flush=True)
    t0 = time.perf_counter()
    prometheus = controller = report = None
    try:
        runner.start(app, args.address, metrics_port=args.metrics_port)
        print(f"serving after {time.perf_counter() - t0:.1f} s (Ray at {runner.ray_address()}: "
              f"`expertmesh rollout status --address {runner.ray_address()}`):")
        for line in runner.endpoints(app):
            print(f"  {line}")
        print(f"  tokens: {tokens} (send `authorization: Bearer <token>`)", flush=True)
        prometheus = _start_prometheus(args)
        if args.replan:
            controller = _start_controller(args, spec, app)
        if args.station_seconds or getattr(args, "station_each", None):
            report = _station_run(args, spec, app, tokens, prometheus)
        if args.stop_after_station and report is not None:
            reason = "station run done"
        else:
            print("serving until Ctrl-C or SIGTERM", flush=True)
            reason = runner.wait_for_signal(args.duration)
        print(f"stopping ({reason}): Prometheus, Serve, then Ray", flush=True)
    finally:
        if controller is not None:
            controller.stop_event.set()
        if prometheus is not None:
            prometheus.stop()
        runner.stop()
    return 1 if report is not None and report.failure() else 0


def cluster_address(address: str | None) -> str | None:
    """--address as given; `local`: the cluster `expertmesh up` started."""
    if address != "local":
        return address
    found = (read_state() or {}).get("address")
    if not found:
        raise FailedPrecondition("--address local, but no local cluster is up", field="--address",
                                 fix="start one with `expertmesh up`, or pass HOST:PORT")
    return found


def _station_run(args: argparse.Namespace, spec: CoESpec, app: AppArgs, tokens: str,
                 prometheus: PrometheusServer | None) -> StationReport:
    table = TokenTable.load(tokens)
    token, factory = next(iter(table.factories_by_token.items()))
    each = getattr(args, "station_each", None)
    how = f"each image {each} time(s)" if each else f"for {args.station_seconds:.0f} s"
    print(f"station run {how} at {args.station_rate} req/s as {factory} ...", flush=True)
    pool = None
    if getattr(args, "station_images", None):  # your files; good parts: folders named by a pass label
        pool = load_images(Path(args.station_images), {p for e in spec.experts for p in e.pass_labels},
                           field="--station-images")
        print(f"  sending {len(pool)} images from {args.station_images}", flush=True)
    report = run_station(f"127.0.0.1:{app.settings.grpc_port}", token, factory, rate_per_s=args.station_rate,
                         duration_s=args.station_seconds or 0.0, mix={c.name: c.probability for c in spec.categories},
                         pool=pool, each=each)
    print(report.format(), flush=True)
    if prometheus is not None:
        _print_hit_rates(prometheus)
    return report


def _start_controller(args: argparse.Namespace, spec: CoESpec, app: AppArgs) -> PlacementController:
    """The placement controller: re-plans and redeploys when a node is lost or joins. It plans every served CoE
    together (`cluster.served`) with the profile entries of the device each expert runs on, as the app is served."""
    if not app.profile:
        raise InvalidArgument("--replan needs a profile", field="--profile", fix="run `expertmesh profile` first")
    demand = served_demand(app.spec, Path(app.zoo), app.coes, ProfileStore.load(Path(app.profile)),
                           app.settings.expert_num_gpus, app.settings.coe_request_shares,
                           warn=lambda m: print(f"warning: {m}", flush=True), require_profiles=True)
    s = app.settings

    def planner(usage, cluster, current):
        return plan_on_inventory(demand, args.plan_rps, usage, cluster, current, host_num_cpus=s.host_num_cpus,
                                 torch_threads=s.torch_threads, dedicate_min_busy=s.dedicate_min_busy,
                                 components_per_request=s.placement_components_per_request)

    def apply(placement: dict[str, list[str]], executors: dict[str, dict]) -> None:
        runner.redeploy(AppArgs.model_validate({**app.model_dump(), "placement": placement,
                                                "executors": executors or None}))
    controller = PlacementController(
        args.address, demand, demand.usage, args.plan_rps, app.placement, apply=apply, planner=planner,
        watch=UsageWatch(scrape_targets), log=lambda m: print(f"[placement] {m}", flush=True),
        executors={n: x.model_dump() for n, x in (app.executors or {}).items()})
    controller.start()
    print("  placement controller: re-plans on node loss or join, a node's memory changing, and lasting traffic drift",
          flush=True)
    return controller


def _start_prometheus(args: argparse.Namespace) -> PrometheusServer | None:
    """A local Prometheus scraping this cluster's nodes, when installed (else a hint); None when not running."""
    if args.no_prometheus:
        return None
    if shutil.which("prometheus") is None:
        print("  metrics: Ray's /metrics on each node (port %d here); install prometheus to get a local server"
              % args.metrics_port, flush=True)
        return None
    prom = PrometheusServer(port=args.prometheus_port).start()
    print(f"  metrics: Prometheus at {prom.url} scraping {', '.join(prom.refresh_targets())}")
    print(f"  expert hit rate: {prom.url}/graph?g0.expr=" + urllib.parse.quote(HIT_RATE_SINCE_START, safe=""))
    print(f"     query: {HIT_RATE_SINCE_START}", flush=True)
    return prom


def _print_hit_rates(prom: PrometheusServer, wait_s: float = 25.0) -> None:
    """After a station run: the hit rates Prometheus has (Ray reports metrics every few seconds)."""
    deadline = time.monotonic() + wait_s
    rows = []
    while time.monotonic() < deadline and not rows:
        time.sleep(5)
        rows = prom.query(HIT_RATE_SINCE_START)
    if not rows:
        print("expert hit rate: no data in Prometheus yet", flush=True)
        return
    print("expert hit rate (Prometheus, since start):")
    for r in sorted(rows, key=lambda r: r["metric"].get("expert", "")):
        print(f"  {r['metric'].get('expert', '?'):<24} {float(r['value'][1]):.3f}")
