"""The `expertmesh` command line. Bad input ends with a message naming the field and the fix, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from expertmesh.errors import CLI_EXIT_CODE, ExpertMeshError, SpecError


def _spec_and_zoo(args) -> tuple:
    from expertmesh.experts.spec import default_zoo_root, load_spec

    spec_path = Path(args.spec) if args.spec else None
    spec = load_spec(spec_path)
    zoo_root = Path(args.zoo).resolve() if args.zoo else default_zoo_root(spec, spec_path)
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

    spec, zoo_root = _spec_and_zoo(args)
    from expertmesh.experts.spec import check_spec

    problems = check_spec(spec, zoo_root)
    if problems:
        raise SpecError(problems, args.spec or "<embedded pcb-aoi spec>")
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
