"""`expertmesh bench simulate`: its options. The run (bench/simulate_run.py, matplotlib included) is imported only
when the command runs, so the command line's other commands do not wait for it."""

from __future__ import annotations

import argparse
import importlib


def _whole(minimum: int):
    """An argparse `type`: a whole number of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
        return value
    return parse


def _run(args: argparse.Namespace) -> int:
    if args.check:
        return importlib.import_module("expertmesh.bench.simulate_check").cmd_check(args)
    return importlib.import_module("expertmesh.bench.simulate_run").cmd_bench_simulate(args)


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add `simulate` to `expertmesh bench`."""
    sim = bench_subparsers.add_parser(
        "simulate", help="the memory-tier simulator at CoServe's scale (350 experts, 60 GiB, 12 GiB device, 16 GiB "
                         "host, 530 MB/s disk): every policy and the ablation; writes PREFIX.json, .md and .png")
    sim.add_argument("--out", default="bench/results/simulate",
                     help="prefix of the files written (default: bench/results/simulate)")
    sim.add_argument("--seed", type=_whole(0), default=0, help="workload seed (default 0)")
    sim.add_argument("--num-tasks", type=_whole(1),
                     help="tasks of 2,500-3,500 images (default 5; --quick 2 of 250-350)")
    sim.add_argument("--quick", action="store_true",
                     help="a small version in seconds: 40 component experts, the machine scaled to match")
    sim.add_argument("--check", metavar="MEMORY_JSON",
                     help="instead: predict this memory-benchmark run (bench/results/memory.json) from this machine's "
                          "profile of its CoE and its own requests, measured beside simulated; writes "
                          "bench/results/simulate_check.json and .md (or --out)")
    sim.add_argument("--profile", help="with --check: the profile of the benchmark's CoE (default: <its zoo>/profile.json)")
    sim.set_defaults(func=_run)
