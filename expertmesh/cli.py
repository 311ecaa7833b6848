"""The `expertmesh` command line. Bad input ends with a message naming the field and the fix, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from expertmesh.cluster import commands as cluster_commands
from expertmesh.errors import CLI_EXIT_CODE, ExpertMeshError, FailedPrecondition, InvalidArgument, SpecError


def _spec_and_zoo(args) -> tuple:
    from expertmesh.experts.spec import default_zoo_root, load_spec

    spec_path = Path(args.spec) if args.spec else None
    spec = load_spec(spec_path)
    zoo_root = Path(args.zoo).resolve() if args.zoo else default_zoo_root(spec, spec_path)
    return spec, zoo_root


def _checked_spec_and_zoo(args) -> tuple:
    """`_spec_and_zoo`, refusing (SpecError, exit 2) a spec whose checks or checkpoints fail."""
    from expertmesh.experts.spec import check_spec

    spec, zoo_root = _spec_and_zoo(args)
    problems = check_spec(spec, zoo_root)
    if problems:
        raise SpecError(problems, args.spec or "<embedded pcb-aoi spec>")
    return spec, zoo_root


def cmd_spec_check(args) -> int:
    from expertmesh.experts.graph import usage_probabilities
    from expertmesh.experts.spec import check_spec

    args.spec = args.file
    spec, zoo_root = _spec_and_zoo(args)
    if not args.skip_checkpoints:
        problems = check_spec(spec, zoo_root)
        if problems:
            raise SpecError(problems, args.file or "<embedded pcb-aoi spec>")
    usage = usage_probabilities(spec)
    print(f"{args.file or 'embedded spec'}: OK: CoE {spec.name!r}, {len(spec.experts)} experts, "
          f"{len(spec.categories)} categories, {len(spec.dependencies)} dependencies, {len(spec.gating_rules)} rules"
          + ("" if args.skip_checkpoints else f", checkpoints present in {zoo_root}"))
    print("usage probability per request:")
    for name, p in sorted(usage.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24}{p:>8.4f}")
    return 0


def cmd_zoo_build(args) -> int:
    from expertmesh.experts.zoo import build_zoo

    spec, zoo_root = _spec_and_zoo(args)
    if args.seed is not None:
        spec = spec.model_copy(update={"seed": args.seed})
    print(f"building zoo of {spec.name!r} into {zoo_root}")
    res = build_zoo(spec, zoo_root, only=args.only, force=args.force, baseline=not args.no_baseline,
                    device=args.device, progress=not args.no_progress)
    print(f"zoo build done in {res.seconds:.1f} s: {len(res.trained)} trained, {len(res.skipped)} up to date")
    return 0


def cmd_zoo_report(args) -> int:
    from expertmesh.experts.report import evaluate, format_report, write_report

    spec, zoo_root = _checked_spec_and_zoo(args)
    report = evaluate(spec, zoo_root, progress=not args.no_progress)
    print(format_report(report))
    out = Path(args.json) if args.json else zoo_root / "report.json"
    write_report(report, out)
    print(f"JSON report: {out}")
    if args.min_router_accuracy is not None and report.router_accuracy < args.min_router_accuracy:
        print(f"FAIL: router accuracy {report.router_accuracy:.4f} < {args.min_router_accuracy}", file=sys.stderr)
        return 1
    if args.min_verdict_accuracy is not None and report.coe.verdict_accuracy < args.min_verdict_accuracy:
        print(f"FAIL: verdict accuracy {report.coe.verdict_accuracy:.4f} < {args.min_verdict_accuracy}", file=sys.stderr)
        return 1
    return 0


def _app_args(args, spec_path: str | None, zoo_root: Path, tokens_file: str):
    from pydantic import ValidationError

    from expertmesh.deployments.config import AppArgs, ServeSettings
    from expertmesh.profiler.run import default_store_path

    try:
        settings = ServeSettings(http_host=args.http_host, http_port=args.http_port, grpc_port=args.grpc_port,
                                 expert_device_idle_s=args.device_idle_s, expert_host_idle_s=args.host_idle_s,
                                 expert_num_gpus=args.expert_num_gpus)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        flags = {"expert_device_idle_s": "--device-idle-s", "expert_host_idle_s": "--host-idle-s"}
        option = flags.get(name, "--" + name.replace("_", "-")) if name else "serve options"
        message, _, fix = err["msg"].removeprefix("Value error, ").partition("; fix: ")
        raise InvalidArgument(message, field=option, fix=fix or "see `expertmesh serve --help` for the allowed values") from None
    profile = None
    if not args.no_profile:
        profile = Path(args.profile) if args.profile else default_store_path(zoo_root)
        if args.profile and not profile.is_file():
            raise InvalidArgument(f"no profile at {profile}", field="--profile", fix="run `expertmesh profile` first")
        if profile.is_file():
            print(f"profile: {profile} (current entries set batch sizes and autoscaling targets)", file=sys.stderr)
        else:
            profile = None
    placement = None
    if args.plan:
        try:
            placement = json.loads(Path(args.plan).read_text())["replicas"]
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidArgument(f"{args.plan} is not a plan ({type(exc).__name__})", field="--plan",
                                  fix="write one with `expertmesh plan --json FILE`") from None
    return AppArgs(spec=str(Path(spec_path).resolve()) if spec_path else None, zoo=str(zoo_root),
                   tokens_file=str(Path(tokens_file).resolve()), profile=str(profile.resolve()) if profile else None,
                   placement=placement, settings=settings)


def _tokens_file(args) -> str:
    import os

    from expertmesh.deployments.auth import TOKENS_ENV, write_dev_tokens
    from expertmesh.deployments.runner import dev_tokens_path

    chosen = args.tokens or os.environ.get(TOKENS_ENV)
    if chosen:
        return chosen
    path = dev_tokens_path()
    if not path.is_file():
        write_dev_tokens(path, ["factory-a", "factory-b"])
        print(f"generated dev tokens for factory-a and factory-b: {path}", file=sys.stderr)
    else:
        print(f"using dev tokens: {path}", file=sys.stderr)
    return str(path)


def cmd_config(args) -> int:
    import yaml

    from expertmesh.deployments.config import build_serve_config

    spec, zoo_root = _spec_and_zoo(args)
    tokens = args.tokens or "/etc/expertmesh/tokens.yaml"
    config = build_serve_config(spec, _app_args(args, args.spec, zoo_root, tokens),
                                warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    text = "# Serve config written by `expertmesh config`; run it with `serve deploy` on a running Ray cluster.\n"
    text += yaml.safe_dump(config, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def cmd_serve(args) -> int:
    from expertmesh.deployments import runner
    from expertmesh.deployments.auth import TokenTable
    from expertmesh.station import run_station

    spec, zoo_root = _spec_and_zoo(args)
    if args.address == "local":  # the cluster `expertmesh up` started
        from expertmesh.cluster.local import read_state

        args.address = (read_state() or {}).get("address")
        if not args.address:
            raise FailedPrecondition("--address local, but no local cluster is up", field="--address",
                                     fix="start one with `expertmesh up`, or pass HOST:PORT")
    tokens_file = _tokens_file(args)
    app_args = _app_args(args, args.spec, zoo_root, tokens_file)
    print(f"starting Ray and Serve, deploying {spec.name!r} ({len(spec.experts)} experts) from {zoo_root} ...", flush=True)
    t0 = time.perf_counter()
    prometheus = controller = None
    if args.replan and not (args.address and app_args.placement):
        raise InvalidArgument("--replan needs a cluster and a plan", field="--replan",
                              fix="pass --address HOST:PORT and --plan FILE (expertmesh up; expertmesh plan --json FILE)")
    try:
        runner.start(app_args, args.address, metrics_port=args.metrics_port)
        print(f"serving after {time.perf_counter() - t0:.1f} s:")
        for line in runner.endpoints(app_args):
            print(f"  {line}")
        print(f"  tokens: {tokens_file} (send `authorization: Bearer <token>`)", flush=True)
        prometheus = _start_prometheus(args)
        if args.replan:
            controller = _start_controller(args, spec, zoo_root, app_args)
        if args.station_seconds:
            table = TokenTable.load(tokens_file)
            token, factory = next(iter(table.factories_by_token.items()))
            print(f"station run for {args.station_seconds:.0f} s at {args.station_rate} req/s as {factory} ...", flush=True)
            report = run_station(f"127.0.0.1:{app_args.settings.grpc_port}", token, factory, rate_per_s=args.station_rate,
                                 duration_s=args.station_seconds,
                                 mix={c.name: c.probability for c in spec.categories})
            print(report.format(), flush=True)
            if prometheus is not None:
                _print_hit_rates(prometheus)
        if args.stop_after_station and args.station_seconds:
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
    return 0


def _start_controller(args, spec, zoo_root, app_args):
    """The placement controller: re-plans and redeploys when a node is lost or joins."""
    from expertmesh.cluster.controller import PlacementController
    from expertmesh.cluster.observed import UsageWatch
    from expertmesh.cluster.prometheus import scrape_targets
    from expertmesh.deployments import runner
    from expertmesh.profiler.run import usable_profiles
    from expertmesh.profiler.store import ProfileStore
    from expertmesh.profiler.usage import from_spec

    if not app_args.profile:
        raise InvalidArgument("--replan needs a profile", field="--profile", fix="run `expertmesh profile` first")
    store = ProfileStore.load(Path(app_args.profile))
    profiles = usable_profiles(store, spec, zoo_root, "cpu")
    controller = PlacementController(
        args.address, spec, profiles, store.usage or from_spec(spec), args.plan_rps, app_args.placement,
        apply=lambda placement: runner.redeploy(app_args.model_copy(update={"placement": placement})),
        watch=UsageWatch(scrape_targets, spec.router.expert), log=lambda m: print(f"[placement] {m}", flush=True))
    controller.start()
    print("  placement controller: re-plans on node loss or join, and on lasting traffic drift", flush=True)
    return controller


def _start_prometheus(args):
    """A local Prometheus scraping this cluster's nodes, when installed (else a hint); None when not running."""
    import shutil

    from expertmesh.cluster.prometheus import PrometheusServer
    from expertmesh.deployments.dashboard import HIT_RATE_SINCE_START

    if args.no_prometheus:
        return None
    if shutil.which("prometheus") is None:
        print("  metrics: Ray's /metrics on each node (port %d here); install prometheus to get a local server"
              % args.metrics_port, flush=True)
        return None
    prom = PrometheusServer(port=args.prometheus_port).start()
    print(f"  metrics: Prometheus at {prom.url} scraping {', '.join(prom.refresh_targets())}")
    print(f"  expert hit rate: {prom.url}/graph?g0.expr=" + _url_quote(HIT_RATE_SINCE_START))
    print(f"     query: {HIT_RATE_SINCE_START}", flush=True)
    return prom


def _url_quote(text: str) -> str:
    import urllib.parse

    return urllib.parse.quote(text, safe="")


def _print_hit_rates(prom, wait_s: float = 25.0) -> None:
    """After a station run: the hit rates Prometheus has (Ray reports metrics every few seconds)."""
    from expertmesh.deployments.dashboard import HIT_RATE_SINCE_START

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


def cmd_profile(args) -> int:
    from expertmesh.profiler.measure import MeasureConfig
    from expertmesh.profiler.plot import plot_profiles
    from expertmesh.profiler.run import default_store_path, format_profiles, measure_usage, profile_zoo

    spec, zoo_root = _checked_spec_and_zoo(args)
    out = Path(args.out) if args.out else default_store_path(zoo_root)
    cfg = MeasureConfig(runs=args.runs, max_batch=args.max_batch)
    t0 = time.perf_counter()
    store = profile_zoo(spec, zoo_root, out, devices=args.device, experts=args.experts, cfg=cfg, force=args.force,
                        progress=not args.no_progress)
    print(f"usage weights from {args.usage} ...", flush=True)
    store.usage = measure_usage(spec, zoo_root, args.usage, traces=args.traces, sample_size=args.sample_size)
    store.save(out)
    print(format_profiles(store))
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot_profiles([store.entries[k] for k in sorted(store.entries)], plot, title=f"{spec.name}: latency against batch size")
    print(f"profile: {out}\nplot: {plot}\ntook {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_dashboard(args) -> int:
    from expertmesh.deployments.dashboard import dashboard_json

    text = dashboard_json()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_station(args) -> int:
    from expertmesh.station import run_station

    report = run_station(args.target, args.token, args.factory, rate_per_s=args.rate, duration_s=args.duration,
                         station_id=args.station, board_fraction=args.board_fraction, defect_rate=args.defect_rate,
                         seed=args.seed, progress=not args.no_progress,
                         traces_path=Path(args.traces) if args.traces else None)
    print(report.format())
    if args.json:
        Path(args.json).write_text(report.to_json())
    return 0


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", help="tokens YAML of `token: factory_id` lines (default: $EXPERTMESH_TOKENS_FILE, "
                                    "else a generated dev file under $EXPERTMESH_HOME)")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--profile", help="profile store to take batch sizes and autoscaling targets from "
                                     "(default: <zoo>/profile.json when it exists)")
    p.add_argument("--no-profile", action="store_true", help="use the spec's batch sizes and targets")
    p.add_argument("--plan", help="plan JSON (expertmesh plan --json): pin each expert's replicas to its planned nodes")
    p.add_argument("--device-idle-s", type=float, help="an expert replica idle this long moves its weights off the "
                                                       "device to host memory (default: never)")
    p.add_argument("--expert-num-gpus", type=float, default=0.0, help="GPUs per replica of a cuda/auto expert "
                                                                      "(fractions share a GPU; default 0: CPU)")
    p.add_argument("--host-idle-s", type=float, help="an expert replica idle this long drops its weights to disk "
                                                     "(default: never); the next request loads them back")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value
    return parse


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="CoE spec YAML (default: the embedded pcb-aoi spec)")
    p.add_argument("--zoo", help="zoo directory holding the checkpoints (default: the spec's zoo_dir, "
                                 "else $EXPERTMESH_HOME/zoo/<name>, EXPERTMESH_HOME defaulting to ~/.cache/expertmesh)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    spec = sub.add_parser("spec", help="CoE spec tools").add_subparsers(dest="spec_command", required=True)
    check = spec.add_parser("check", help="validate a CoE spec (exit 2 with every problem listed)")
    check.add_argument("file", nargs="?", help="spec YAML (default: the embedded pcb-aoi spec)")
    check.add_argument("--zoo", help="zoo directory to look for checkpoints in")
    check.add_argument("--skip-checkpoints", action="store_true", help="do not require checkpoints on disk")
    check.set_defaults(func=cmd_spec_check)

    zoo = sub.add_parser("zoo", help="build and evaluate the model zoo").add_subparsers(dest="zoo_command", required=True)
    build = zoo.add_parser("build", help="train every expert whose checkpoint is missing or stale")
    _add_spec_args(build)
    build.add_argument("--seed", type=int, help="override the spec's seed")
    build.add_argument("--only", nargs="+", metavar="EXPERT", help="build only these experts ('monolithic' for the baseline)")
    build.add_argument("--force", action="store_true", help="retrain even if checkpoints are current")
    build.add_argument("--no-baseline", action="store_true", help="skip the monolithic baseline")
    build.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="train on this device")
    build.set_defaults(func=cmd_zoo_build)
    report = zoo.add_parser("report", help="accuracy report on held-out generated images (table + JSON)")
    _add_spec_args(report)
    report.add_argument("--json", help="where to write the JSON report (default: <zoo>/report.json)")
    report.add_argument("--min-router-accuracy", type=float, help="exit 1 if the router is less accurate")
    report.add_argument("--min-verdict-accuracy", type=float, help="exit 1 if the CoE's verdicts are less accurate")
    report.set_defaults(func=cmd_zoo_report)

    config = sub.add_parser("config", help="write the Serve config file (`serve deploy` accepts it) for a spec")
    _add_spec_args(config)
    _add_serve_args(config)
    config.add_argument("--out", help="file to write (default: stdout)")
    config.set_defaults(func=cmd_config)

    serve = sub.add_parser("serve", help="start Ray + Serve on loopback (or join --address) and serve the CoE")
    _add_spec_args(serve)
    _add_serve_args(serve)
    serve.add_argument("--address", help="join this Ray cluster (HOST:PORT, or `local`: the one `expertmesh up` "
                                          "started) instead of starting one")
    serve.add_argument("--station-seconds", type=_positive(float), help="after deploying, run a station for this long")
    serve.add_argument("--station-rate", type=_positive(float), default=10.0, help="station requests per second")
    serve.add_argument("--stop-after-station", action="store_true", help="stop cleanly after the station run")
    serve.add_argument("--duration", type=_positive(float), help="stop after this many seconds (default: until a signal)")
    serve.add_argument("--replan", action="store_true", help="watch the cluster and re-plan and redeploy on node loss "
                                                             "or join (needs --address and --plan)")
    serve.add_argument("--plan-rps", type=float, default=20.0, help="requests per second re-plans are made for")
    serve.add_argument("--metrics-port", type=int, default=8080,
                       help="Ray's metrics export port of the node started here (Prometheus scrapes it)")
    serve.add_argument("--prometheus-port", type=int, default=9090, help="port of the local Prometheus, when installed")
    serve.add_argument("--no-prometheus", action="store_true", help="do not start a local Prometheus")
    serve.set_defaults(func=cmd_serve)

    prof = sub.add_parser("profile", help="measure each expert: latency vs batch size, memory, load time per tier")
    _add_spec_args(prof)
    prof.add_argument("--device", action="append", choices=["cpu", "cuda"], help="device(s) to profile on "
                                                                                 "(repeatable; default: every one present)")
    prof.add_argument("--experts", nargs="+", metavar="EXPERT", help="only these experts (default: all)")
    prof.add_argument("--out", help="profile store (default: <zoo>/profile.json)")
    prof.add_argument("--plot", help="PNG of latency against batch size (default: next to the store)")
    prof.add_argument("--runs", type=int, default=15, help="timed runs per batch size (medians are reported)")
    prof.add_argument("--max-batch", type=int, help="largest batch to measure (default: each expert's max_batch)")
    prof.add_argument("--force", action="store_true", help="measure again even where the store is current")
    prof.add_argument("--usage", choices=["spec", "sample", "traces"], default="sample",
                      help="usage weights from the spec's mix, a generated sample run through the CoE, or traces")
    prof.add_argument("--traces", help="JSONL of responses (expertmesh station --traces) for --usage traces")
    prof.add_argument("--sample-size", type=int, default=2000, help="images in the generated sample")
    prof.set_defaults(func=cmd_profile)

    cluster_commands.register(sub, _add_spec_args, _positive)

    dash = sub.add_parser("dashboard", help="write the Grafana dashboard JSON (the shipped one is this output)")
    dash.add_argument("--out", help="file to write (default: stdout)")
    dash.set_defaults(func=cmd_dashboard)

    station = sub.add_parser("station", help="a line-side station: send generated images over gRPC, print the figures")
    station.add_argument("--target", default="127.0.0.1:9000", help="gRPC HOST:PORT")
    station.add_argument("--token", required=True, help="the factory's bearer token")
    station.add_argument("--factory", required=True, help="factory_id the token belongs to")
    station.add_argument("--station", default="station-1", help="station_id to send")
    station.add_argument("--rate", type=_positive(float), default=10.0, help="requests per second (open loop)")
    station.add_argument("--duration", type=_positive(float), default=30.0, help="seconds to send for")
    station.add_argument("--board-fraction", type=float, default=0.1, help="share of requests sent as InspectBoard")
    station.add_argument("--defect-rate", type=float, default=0.3, help="share of generated parts with a defect")
    station.add_argument("--seed", type=int, default=7)
    station.add_argument("--json", help="also write the figures as JSON here")
    station.add_argument("--traces", help="write every response's trace as JSON lines here (input of "
                                          "`expertmesh profile --usage traces`)")
    station.add_argument("--no-progress", action="store_true")
    station.set_defaults(func=cmd_station)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CLI_EXIT_CODE
    except ExpertMeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CLI_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
