"""The model commands of the CLI: `expertmesh zoo build`, `zoo report`, `zoo calibrate` and `profile` (glue over experts/ and profiler/).

They train, evaluate and measure models, so this module imports torch and transformers (tens of seconds on a small
machine); `cli.py` imports it only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from expertmesh.cli_options import checked_spec_and_zoo, emit_json, spec_and_zoo, wants_json_stdout
from expertmesh.errors import InvalidArgument
from expertmesh.experts import file_baseline, file_eval
from expertmesh.experts.calibration import CalibrationConfig
from expertmesh.experts.report import evaluate, format_report, write_report
from expertmesh.experts.spec import default_spec_path
from expertmesh.experts.strict_yaml import load_strict
from expertmesh.experts.zoo import BASELINE_SETS, build_zoo
from expertmesh.profiler.calibration_run import calibrate, format_result, write_spec
from expertmesh.profiler.measure import MeasureConfig
from expertmesh.profiler.plot import plot_profiles
from expertmesh.profiler.run import format_profiles, measure_usage, profile_zoo
from expertmesh.profiler.serving_profiles import default_store_path


def cmd_zoo_build(args: argparse.Namespace) -> int:
    spec, zoo_root = spec_and_zoo(args)
    if args.seed is not None:
        spec = spec.model_copy(update={"seed": args.seed})
    print(f"building zoo of {spec.name!r} into {zoo_root}")
    baselines = BASELINE_SETS["none" if args.no_baseline else args.baselines]
    res = build_zoo(spec, zoo_root, only=args.only, force=args.force, baselines=baselines,
                    device=args.device, progress=not args.no_progress)
    wanted = set(baselines) if args.only is None else set(args.only)
    if file_baseline.NAME in wanted and file_baseline.applies(spec):  # a CoE on files: its monolith, after its experts
        t0 = time.perf_counter()
        outcome, _ = file_baseline.build(spec, zoo_root, device=args.device, progress=not args.no_progress,
                                         force=args.force)
        (res.trained if outcome == "trained" else res.skipped if outcome == "current" else []).append(file_baseline.NAME)
        res.seconds += time.perf_counter() - t0
    print(f"zoo build done in {res.seconds:.1f} s: {len(res.trained)} trained, {len(res.skipped)} up to date")
    return 0


def cmd_zoo_report(args: argparse.Namespace) -> int:
    spec, zoo_root = checked_spec_and_zoo(args)
    if file_eval.router_on_files(spec):  # the user's own images: their held-out split, not generated ones
        report = file_eval.evaluate(spec, zoo_root, progress=not args.no_progress)
        print(file_eval.format_report(report))
    else:
        report = evaluate(spec, zoo_root, progress=not args.no_progress)
        print(format_report(report))
    if wants_json_stdout(args):
        emit_json(args, json.dumps(report.model_dump(), indent=2))
    else:
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


def cmd_zoo_calibrate(args: argparse.Namespace) -> int:
    spec, zoo_root = checked_spec_and_zoo(args)
    source = Path(args.spec) if args.spec else default_spec_path()
    try:
        config = CalibrationConfig(target_wrong_route=args.target_wrong_route, tie_tolerance=args.tie_tolerance,
                                   target_defect_recall=args.target_defect_recall)
    except ValueError as exc:
        err = exc.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err.get("loc") else "--target-wrong-route"
        raise InvalidArgument(f"bad calibration option {flag}: {err['msg']}", field=flag,
                              fix="give a share between 0 and 1, e.g. 0.01 for --target-wrong-route or 0.95 for "
                                  "--target-defect-recall") from None
    result, new_data = calibrate(spec, load_strict(source.read_text()), zoo_root, config,
                                 profile=Path(args.profile) if args.profile else None, progress=not args.no_progress,
                                 warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    print(format_result(result))
    emit_json(args, json.dumps(result.model_dump(), indent=1))
    t = result.threshold
    if not t.reachable:
        raise InvalidArgument(f"no router threshold reaches a wrong-route rate of {t.target_wrong_route} on the "
                              f"validation images (the lowest any reaches is {t.lowest_wrong_route_rate:.4f}); "
                              "no spec written", field="--target-wrong-route",
                              fix=f"give a target of at least {t.lowest_wrong_route_rate:.4f}, or improve the router")
    out = Path(args.out) if args.out else zoo_root / f"{spec.name}.v{result.new_version}.yaml"
    write_spec(new_data, result, out, str(source), source.resolve().parent)
    print(f"wrote {out} (version {result.new_version}); check it with `expertmesh zoo report --spec {out}"
          + ("" if args.zoo is None else f" --zoo {zoo_root}") + "`")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    spec, zoo_root = checked_spec_and_zoo(args)
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
