"""`expertmesh bench memory`: the memory-limited serving benchmark (bench/memory_run.py) and its results files:
PREFIX.json (commit, machine, settings, the workload, every system's figures), PREFIX.md (the tables) and PREFIX.png.

`register` adds the subcommand to `expertmesh bench`. The run imports torch and Ray, which `expertmesh --help` must
not wait for, so the handler imports the run's modules when the command runs (as cli.loaded_on_use does).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from expertmesh.cli_options import positive
from expertmesh.errors import InvalidArgument

SYSTEM_NAMES = ("all_resident", "expertmesh", "multiplexed_best", "multiplexed", "multiplexed_mean_k", "fcfs_lru",
                "evict_only", "evict_arrange", "expertmesh_2x_pow2", "expertmesh_2x_assign")


def register(bench: argparse._SubParsersAction) -> None:
    """Add `memory` to the `expertmesh bench` subcommands."""
    p = bench.add_parser("memory", help="memory-limited serving: ExpertMesh's pooled hosts against Ray Serve "
                                        "multiplexing, FCFS + LRU and every expert resident, closed and open loop; "
                                        "writes PREFIX.json, .md and .png")
    p.add_argument("--out", default="bench/results/memory", help="prefix of the files written "
                                                                   "(default: bench/results/memory)")
    p.add_argument("--quick", action="store_true", help="a short run (few experts, seconds per system)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the table and plot of this results file")
    p.add_argument("--note", help="a note kept in the results")
    p.add_argument("--systems", nargs="+", metavar="SYSTEM", choices=SYSTEM_NAMES,
                   help=f"only these of {' '.join(SYSTEM_NAMES)} (default: all; the label check needs all_resident)")
    p.add_argument("--parts", nargs="+", choices=("closed", "open"), help="closed loop, open loop (default: both)")
    p.add_argument("--workloads", nargs="+", choices=("components", "boards"),
                   help="one component per request, boards of many (default: both)")
    p.add_argument("--components-per-board", type=int, help="components of a board (default 32)")
    p.add_argument("--board-stations", type=int, help="stations of the boards workload (default 4)")
    p.add_argument("--workload-dir", help="where the workload CoE is built and reused "
                                          "(default: $EXPERTMESH_HOME/bench/memory-...)")
    p.add_argument("--small-experts", type=int, help="small experts in the workload (default 40; --quick 6)")
    p.add_argument("--large-experts", type=int, help="ResNet-18-class experts (default 8; --quick 3)")
    p.add_argument("--stations", type=int, help="stations: the closed loop's concurrency (default 8)")
    p.add_argument("--closed-requests", type=int, help="requests of the closed-loop run (default 600)")
    p.add_argument("--device-budget-fraction", type=positive(float), help="device budget, of all experts' bytes "
                                                                          "(default 1/3)")
    p.add_argument("--host-budget-fraction", type=positive(float), help="host-memory budget of the pooled hosts, of "
                                                                        "all experts' bytes (default 2/3)")
    p.add_argument("--k-rule", choices=("largest", "usage", "mean"),
                   help="(b)'s K: the device budget over the largest expert's bytes (default: never over the budget), "
                        "the most used experts that fit it together, or the budget over the mean expert's bytes")
    p.add_argument("--multiplexed-k", type=int, help="K given outright")
    p.add_argument("--target-p99-ms", type=positive(float), help="the open-loop p99 bound (default 1000)")
    p.add_argument("--point-s", type=positive(float), help="seconds per open-loop point (default 10; --quick 1)")
    p.set_defaults(func=cmd_bench_memory)


def settings_overrides(args: argparse.Namespace) -> dict:
    given = {"systems": tuple(args.systems) if args.systems else None,
             "parts": tuple(args.parts) if args.parts else None, "workload_dir": args.workload_dir,
             "workloads": tuple(args.workloads) if args.workloads else None,
             "components_per_board": args.components_per_board, "board_stations": args.board_stations,
             "num_small_experts": args.small_experts, "num_large_experts": args.large_experts,
             "num_stations": args.stations, "closed_requests": args.closed_requests,
             "device_budget_fraction": args.device_budget_fraction, "host_budget_fraction": args.host_budget_fraction,
             "k_rule": args.k_rule, "multiplexed_k": args.multiplexed_k, "target_p99_ms": args.target_p99_ms,
             "point_s": args.point_s}
    return {k: v for k, v in given.items() if v is not None}


def load_results(path: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read results JSON {path!r}: {exc}", field="--render",
                              fix="give a file `expertmesh bench memory` wrote (PREFIX.json)") from None
    if doc.get("benchmark") != "memory":
        raise InvalidArgument(f"{path!r} is not a memory benchmark results file", field="--render",
                              fix="give a file `expertmesh bench memory` wrote (PREFIX.json)")
    return doc


def write_results(doc: dict, out: Path) -> list[Path]:
    table = importlib.import_module("expertmesh.bench.memory_table")
    plot = importlib.import_module("expertmesh.bench.memory_plot")  # matplotlib: loaded when the command runs
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_name(out.name + ext) for ext in (".json", ".md", ".png")]
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    paths[1].write_text(table.markdown(doc))
    plot.plot(doc, paths[2])
    return paths


def cmd_bench_memory(args: argparse.Namespace) -> int:
    if args.render:
        doc = load_results(args.render)
    else:
        run = importlib.import_module("expertmesh.bench.memory_run")  # torch and Ray: loaded when the command runs
        try:
            overrides = settings_overrides(args)
            settings = run.MemorySettings.quick(**overrides) if args.quick else run.MemorySettings(**overrides)
        except ValueError as exc:
            raise InvalidArgument(f"bad benchmark settings: {exc}", field="expertmesh bench memory",
                                  fix="see `expertmesh bench memory --help`") from None
        doc = run.run_memory(settings)
        doc["command"] = "expertmesh " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    if args.note:
        doc["note"] = args.note
    for path in write_results(doc, Path(args.out)):
        print(f"wrote {path}")
    return 0
