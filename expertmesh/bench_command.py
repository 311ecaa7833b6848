"""`expertmesh bench throughput`: run the throughput benchmark (bench/throughput_run.py) and write its results:
PREFIX.json (commit, machine, settings, every point), PREFIX.md (the table) and PREFIX.png (the plot)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from expertmesh.bench.throughput_plot import plot
from expertmesh.bench.throughput_run import PARTS, ThroughputSettings, run_throughput
from expertmesh.bench.throughput_table import markdown
from expertmesh.cli_options import spec_and_zoo
from expertmesh.errors import InvalidArgument

def settings_from(args: argparse.Namespace) -> ThroughputSettings:
    unknown = sorted(set(args.parts or ()) - set(PARTS))
    if unknown:
        raise InvalidArgument(f"unknown part(s): {', '.join(unknown)}", field="--parts",
                              fix=f"choose among {' '.join(PARTS)}")
    overrides = {k: v for k, v in {"point_s": args.point_s, "noop_start_per_s": args.noop_start_rate,
                                   "single_start_per_s": args.single_start_rate,
                                   "board_start_per_s": args.board_start_rate, "deadline_s": args.deadline_s,
                                   "parts": tuple(args.parts) if args.parts else None}.items() if v is not None}
    return ThroughputSettings.quick(**overrides) if args.quick else ThroughputSettings(**overrides)


def load_results(path: str, field: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read results JSON {path!r}: {exc}", field=field,
                              fix="give a file `expertmesh bench throughput` wrote (PREFIX.json)") from None
    if doc.get("benchmark") != "throughput":
        raise InvalidArgument(f"{path!r} is not a throughput results file", field=field,
                              fix="give a file `expertmesh bench throughput` wrote (PREFIX.json)")
    return doc


def write_results(doc: dict, out: Path, before: dict | None) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_name(out.name + ext) for ext in (".json", ".md", ".png")]
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    paths[1].write_text(markdown(doc, before))
    plot(doc, paths[2], before)
    return paths


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    before = load_results(args.before, "--before") if args.before else None
    out = Path(args.out)
    if args.render:
        doc = load_results(args.render, "--render")
    else:
        if args.target and not args.token:
            raise InvalidArgument("--target needs the token of --factory there", field="--token",
                                  fix="pass --token <token>")
        spec, zoo = spec_and_zoo(args)
        profile = Path(args.profile) if args.profile else (zoo / "profile.json")
        doc = run_throughput(settings_from(args), spec, zoo, profile if profile.exists() else None,
                             spec_path=args.spec, target=args.target, token=args.token,
                             factory_id=args.factory)
        doc["command"] = "expertmesh " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
        if before:
            doc["before"] = {"file": args.before, "commit": before.get("commit"), "date": before.get("date")}
    if args.note:
        doc["note"] = args.note
    for path in write_results(doc, out, before):
        print(f"wrote {path}")
    return 0
