"""The `expertmesh` command line. Bad input ends with a message naming the field and the fix, exit code 2; a
runtime failure (a cluster unreachable, a deadline passed) with exit code 1 (expertmesh.errors decides which)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from expertmesh.bench.memory_command import register as register_memory_bench
from expertmesh.bench.simulate_command import register as register_simulate_bench
from expertmesh.cli_options import add_json_arg, add_spec_args, positive, spec_and_zoo, wants_json_stdout
from expertmesh.cluster import commands as cluster_commands
from expertmesh.deployments.served import build_serve_config
from expertmesh.deployments.dashboard import dashboard_json
from expertmesh import __version__
from expertmesh.errors import ExpertMeshError, SpecError
from expertmesh.experts.graph import usage_probabilities
from expertmesh.experts.spec import check_spec
from expertmesh.serve_options import add_serve_args, app_args

Handler = Callable[[argparse.Namespace], int]


def loaded_on_use(module: str, name: str) -> Handler:
    """The handler `name` of `module`, imported when its command runs. The model, serve and station commands import
    torch and Ray (tens of seconds on a small machine), which `--help`, `spec check`, `config` and the cluster
    commands must not wait for. No cycle hides here: those modules import downward only, never this one."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)
    return run


def cmd_spec_check(args: argparse.Namespace) -> int:
    args.spec = args.file
    spec, zoo_root = spec_and_zoo(args)
    if not args.skip_checkpoints:
        problems = check_spec(spec, zoo_root)
        if problems:
            raise SpecError(problems, args.file or "<embedded pcb-aoi spec>")
    usage = usage_probabilities(spec)
    print(f"{args.file or 'embedded spec'}: OK: CoE {spec.name!r}, {len(spec.experts)} experts, "
          f"{len(spec.categories)} categories, {len(spec.dependencies)} dependencies, {len(spec.gating_rules)} rules"
          + ("" if args.skip_checkpoints else f", checkpoints present in {zoo_root}"))
    chosen = {e.name: e.defaults_chosen() for e in spec.experts if e.defaults_chosen()}
    if chosen:
        print("defaults chosen for what the spec leaves out (docs/coe-spec.md):")
        for name, values in chosen.items():
            print(f"  {name:<24}" + ", ".join(f"{k} {v}" for k, v in values.items()))
    print("usage probability per request:")
    for name, p in sorted(usage.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24}{p:>8.4f}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    spec, zoo_root = spec_and_zoo(args)
    tokens = args.tokens or "/etc/expertmesh/tokens.yaml"
    config = build_serve_config(spec, app_args(args, zoo_root, tokens),
                                warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    text = "# Serve config written by `expertmesh config`; run it with `serve deploy` on a running Ray cluster.\n"
    text += yaml.safe_dump(config, sort_keys=False)
    _write_out(text, args.out)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    _write_out(dashboard_json(), args.out)
    return 0


def _write_out(text: str, out: str | None) -> None:
    """`text` into the file --out names (saying so), else to stdout."""
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)


def _add_spec_command(sub: argparse._SubParsersAction) -> None:
    spec = sub.add_parser("spec", help="CoE spec tools").add_subparsers(dest="spec_command", required=True)
    check = spec.add_parser("check", help="validate a CoE spec (exit 2 with every problem listed)")
    check.add_argument("file", nargs="?", help="spec YAML (default: the embedded pcb-aoi spec)")
    check.add_argument("--zoo", help="zoo directory to look for checkpoints in")
    check.add_argument("--skip-checkpoints", action="store_true", help="do not require checkpoints on disk")
    check.set_defaults(func=cmd_spec_check)


def _add_zoo_commands(sub: argparse._SubParsersAction) -> None:
    zoo = sub.add_parser("zoo", help="build and evaluate the model zoo").add_subparsers(dest="zoo_command", required=True)
    build = zoo.add_parser("build", help="train every expert whose checkpoint is missing or stale")
    add_spec_args(build)
    build.add_argument("--seed", type=int, help="override the spec's seed")
    build.add_argument("--only", nargs="+", metavar="EXPERT",
                       help="build only these experts ('monolithic', 'monolithic_total' for the baselines)")
    build.add_argument("--force", action="store_true", help="retrain even if checkpoints are current")
    which = build.add_mutually_exclusive_group()
    which.add_argument("--baselines", choices=["none", "active", "all"], default="active",
                       help="monolithic baselines to build beside the experts: 'active' (default) the one of the "
                            "CoE's active parameters per image, 'all' also the one of its total parameters (for the "
                            "accuracy comparison; about as much training again), 'none'")
    which.add_argument("--no-baseline", action="store_true", help="skip the monolithic baselines (--baselines none)")
    build.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="train on this device")
    build.set_defaults(func=loaded_on_use("expertmesh.zoo_commands", "cmd_zoo_build"))
    report = zoo.add_parser("report", help="accuracy report on held-out generated images (table + JSON)")
    add_spec_args(report)
    add_json_arg(report, "the report", default="<zoo>/report.json")
    report.add_argument("--min-router-accuracy", type=float, help="exit 1 if the router is less accurate")
    report.add_argument("--min-verdict-accuracy", type=float, help="exit 1 if the CoE's verdicts are less accurate")
    report.set_defaults(func=loaded_on_use("expertmesh.zoo_commands", "cmd_zoo_report"))
    calib = zoo.add_parser("calibrate", help="choose the category table and router.min_confidence from measured "
                                             "scores; writes a new spec version")
    add_spec_args(calib)
    calib.add_argument("--target-wrong-route", type=float, default=0.01,
                       help="largest share of accepted requests the router may send to a wrong category (default 0.01)")
    calib.add_argument("--target-defect-recall", type=float,
                       help="also choose each judging expert's operating point (pass_min_probability) so that it finds "
                            "this share of the defects on the validation images, with the fewest false calls (e.g. "
                            "0.95: an escape rate of 5%%); default: keep the operating points")
    calib.add_argument("--tie-tolerance", type=float, default=0.005,
                       help="scores this close to the best are tied; ties go to the cheaper expert (default 0.005)")
    calib.add_argument("--out", help="the new spec YAML (default: <zoo>/<name>.v<version+1>.yaml; never the input "
                                     "spec unless named here)")
    calib.add_argument("--profile", help="profile store for costs (default: <zoo>/profile.json; none: parameters)")
    add_json_arg(calib, "the scores, table and threshold")
    calib.set_defaults(func=loaded_on_use("expertmesh.zoo_commands", "cmd_zoo_calibrate"))


def _add_serving_commands(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="write the Serve config file (`serve deploy` accepts it) for a spec")
    add_spec_args(config)
    add_serve_args(config)
    config.add_argument("--placement-controller", action="store_true",
                        help="run the placement controller inside the app (KubeRay, `serve deploy`): it plans on the "
                             "live nodes and re-plans on node loss, join or drift; the Helm chart's config has it")
    config.add_argument("--out", help="file to write (default: stdout)")
    config.set_defaults(func=cmd_config)

    serve = sub.add_parser("serve", help="start Ray + Serve on loopback (or join --address) and serve the CoE")
    add_spec_args(serve)
    add_serve_args(serve)
    serve.add_argument("--address", help="join this Ray cluster (HOST:PORT, or `local`: the one `expertmesh up` "
                                          "started) instead of starting one")
    serve.add_argument("--station-seconds", type=positive(float), help="after deploying, run a station for this long "
                                                                       "(exit 1 when a station request failed)")
    serve.add_argument("--station-rate", type=positive(float), default=10.0, help="station requests per second")
    serve.add_argument("--stop-after-station", action="store_true", help="stop cleanly after the station run")
    serve.add_argument("--station-images", help="the station sends these files instead of generated images: "
                                                "FOLDER/.../<label>/<image> (or a path,label manifest); good parts are "
                                                "the spec's pass_labels")
    serve.add_argument("--station-each", type=positive(int), help="with --station-images: send every image exactly "
                                                                  "this many times, then score them exactly (the "
                                                                  "station's --each; --station-seconds is ignored)")
    serve.add_argument("--duration", type=positive(float), help="stop after this many seconds (default: until a signal)")
    serve.add_argument("--replan", action="store_true", help="watch the cluster and re-plan and redeploy on node loss "
                                                             "or join (needs --address and --plan)")
    serve.add_argument("--plan-rps", type=float, default=20.0, help="requests per second re-plans are made for")
    serve.add_argument("--metrics-port", type=int, default=8080,
                       help="Ray's metrics export port of the node started here (Prometheus scrapes it)")
    serve.add_argument("--prometheus-port", type=int, default=9090, help="port of the local Prometheus, when installed")
    serve.add_argument("--no-prometheus", action="store_true", help="do not start a local Prometheus")
    serve.set_defaults(func=loaded_on_use("expertmesh.serve_command", "cmd_serve"))

    roll = sub.add_parser("rollout", help="change the experts of a running app with no failed request: update, "
                                          "canary, promote, rollback, status")
    roll.add_argument("action", choices=("status", "update", "canary", "promote", "rollback"),
                      help="status | update SPEC | canary SPEC --factory F [--share X] | promote | rollback")
    roll.add_argument("spec", nargs="?", help="the new revision's spec file (update, canary)")
    roll.add_argument("--address", default="local", help="the Ray cluster: HOST:PORT as `expertmesh serve` printed "
                                                         "it, or `local` (the one `expertmesh up` started)")
    roll.add_argument("--factory", help="canary: the factory whose requests it answers a share of")
    roll.add_argument("--share", type=float, default=0.1, help="canary: that share, in (0, 1] (default 0.1)")
    add_json_arg(roll, "status: each CoE's rollout state and the canary comparisons")
    roll.add_argument("--coe", default="", metavar="NAME", help="the CoE to change, by spec name, when the app serves "
                                                                "several (default: its first, `--spec`)")
    roll.set_defaults(func=loaded_on_use("expertmesh.rollout_command", "cmd_rollout"))

    dash = sub.add_parser("dashboard", help="write the Grafana dashboard JSON (the shipped one is this output)")
    dash.add_argument("--out", help="file to write (default: stdout)")
    dash.set_defaults(func=cmd_dashboard)


def _add_profile_command(sub: argparse._SubParsersAction) -> None:
    prof = sub.add_parser("profile", help="measure each expert: latency vs batch size, memory, load time per tier")
    add_spec_args(prof)
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
    prof.set_defaults(func=loaded_on_use("expertmesh.zoo_commands", "cmd_profile"))


def _add_station_command(sub: argparse._SubParsersAction) -> None:
    station = sub.add_parser("station", help="a line-side station: send generated images over gRPC, print the figures "
                                             "(exit 1 when a request failed or none was answered)")
    station.add_argument("--target", default="127.0.0.1:9000", help="gRPC HOST:PORT")
    station.add_argument("--token", required=True, help="the factory's bearer token")
    station.add_argument("--factory", required=True, help="factory_id the token belongs to")
    station.add_argument("--station", default="station-1", help="station_id to send")
    station.add_argument("--coe", help="the CoE (spec name) every request names; default: the factory's")
    station.add_argument("--rate", type=positive(float), default=10.0, help="requests per second (open loop)")
    station.add_argument("--duration", type=positive(float), default=30.0, help="seconds to send for")
    station.add_argument("--board-fraction", type=float, default=0.1, help="share of requests sent as InspectBoard")
    station.add_argument("--defect-rate", type=float, default=0.3, help="share of generated parts with a defect")
    station.add_argument("--images", help="send these image files instead of generated ones: FOLDER/.../<label>/<image> "
                                           "(the image's folder names its label), or a manifest .csv/.jsonl of path,label "
                                           "rows (paths relative to it)")
    station.add_argument("--each", type=positive(int), help="with --images: send every image exactly this many times "
                                                            "(single requests at --rate, --duration ignored) and score "
                                                            "them exactly: accuracy, escape and false-call rates, "
                                                            "confusion matrix")
    station.add_argument("--pass-labels", default="ok", help="with --images: the labels meaning a good part "
                                                             "(comma-separated)")
    station.add_argument("--seed", type=int, default=7)
    add_json_arg(station, "the figures")
    station.add_argument("--traces", help="write every response's trace as JSON lines here (input of "
                                          "`expertmesh profile --usage traces`)")
    station.add_argument("--no-progress", action="store_true")
    station.set_defaults(func=loaded_on_use("expertmesh.station", "cmd_station"))


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    throughput = bench.add_parser("throughput", help="offline bound, no-op Serve app and ExpertMesh (single, boards) "
                                                     "swept open-loop; writes PREFIX.json, .md and .png")
    add_spec_args(throughput)
    throughput.add_argument("--out", default="bench/results/throughput",
                            help="prefix of the files written (default: bench/results/throughput)")
    throughput.add_argument("--quick", action="store_true", help="a short run (1-2 minutes): fewer, shorter points")
    throughput.add_argument("--before", help="results JSON of the design before, shown beside this run (not re-run)")
    throughput.add_argument("--render", metavar="JSON", help="only rewrite the table and plot of this results file")
    throughput.add_argument("--note", help="a note kept in the results (with --render: set on that file's results)")
    throughput.add_argument("--profile", help="profile store to serve with (default: <zoo>/profile.json if present)")
    throughput.add_argument("--target", help="sweep an ExpertMesh serving at HOST:PORT (starts nothing; needs --token)")
    throughput.add_argument("--token", help="bearer token of --factory at --target")
    throughput.add_argument("--factory", default="bench", help="factory_id of --token (default: bench)")
    throughput.add_argument("--parts", nargs="+", metavar="PART",
                            help="only these of offline noop single board overload (default: all)")
    throughput.add_argument("--point-s", type=positive(float), help="seconds per sweep point (default 5; --quick 2)")
    throughput.add_argument("--noop-start-rate", type=positive(float), help="requests/s the no-op sweep starts at")
    throughput.add_argument("--single-start-rate", type=positive(float), help="requests/s the single sweep starts at")
    throughput.add_argument("--board-start-rate", type=positive(float), help="boards/s the board sweep starts at")
    throughput.add_argument("--deadline-s", type=positive(float), help="per-request deadline (default 30)")
    throughput.set_defaults(func=loaded_on_use("expertmesh.bench_command", "cmd_bench_throughput"))
    register_memory_bench(bench)
    register_simulate_bench(bench)
    isolation = bench.add_parser("isolation", help="one factory floods while another is measured, without and with "
                                                   "quotas; writes PREFIX.json, .md and .png")
    add_spec_args(isolation)
    isolation.add_argument("--out", default="bench/results/isolation", help="prefix of the files written "
                                                                            "(default: bench/results/isolation)")
    isolation.add_argument("--quick", action="store_true", help="short phases (about 2 minutes in all)")
    isolation.add_argument("--render", metavar="JSON", help="only rewrite the table and plot of this results file")
    isolation.set_defaults(func=loaded_on_use("expertmesh.bench.isolation", "cmd_bench_isolation"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertmesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 success; 1 a runtime failure (the cluster, a deadline, a failed check the command "
               "reports); 2 bad input (a spec, a flag, a file: the message names the field and the fix); 130 "
               "interrupted")
    parser.add_argument("--version", action="version", version=f"expertmesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_spec_command(sub)
    _add_zoo_commands(sub)
    _add_serving_commands(sub)
    _add_profile_command(sub)
    cluster_commands.register(sub)
    _add_station_command(sub)
    _add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if wants_json_stdout(args):  # `--json -`: stdout carries the JSON alone; the rest goes to stderr
            args.json_stdout = sys.stdout
            with contextlib.redirect_stdout(sys.stderr):
                return args.func(args)
        return args.func(args)
    except ExpertMeshError as exc:  # SpecError included: every problem listed
        print(f"error: {exc}", file=sys.stderr)
        return exc.cli_exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
