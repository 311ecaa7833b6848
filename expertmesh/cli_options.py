"""Command-line options that commands of several modules share (cli.py, cluster/commands.py), and what they
resolve to: `--spec/--zoo` (the spec and its zoo directory), `--expert-num-gpus`, and positive numbers.

Light on purpose (no torch, no Ray, nothing of deployments/): `cli.py` builds its parser from here, and the
cluster commands use it without reaching into the serving layer. The serve flags are `serve_options.py`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from expertmesh.errors import SpecError
from expertmesh.experts.spec import CoESpec, check_spec, default_zoo_root, load_spec


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse `type` that takes numbers of `kind` greater than 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value
    return parse


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="CoE spec YAML (default: the embedded pcb-aoi spec)")
    p.add_argument("--zoo", help="zoo directory holding the checkpoints (default: the spec's zoo_dir, "
                                 "else $EXPERTMESH_HOME/zoo/<name>, EXPERTMESH_HOME defaulting to ~/.cache/expertmesh)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def spec_and_zoo(args: argparse.Namespace) -> tuple[CoESpec, Path]:
    """The spec of `--spec` (default: the embedded one) and its zoo directory (`--zoo`, else the default)."""
    spec_path = Path(args.spec) if args.spec else None
    spec = load_spec(spec_path)
    zoo_root = Path(args.zoo).resolve() if args.zoo else default_zoo_root(spec, spec_path)
    return spec, zoo_root


def checked_spec_and_zoo(args: argparse.Namespace) -> tuple[CoESpec, Path]:
    """`spec_and_zoo`, refusing (SpecError, exit 2) a spec whose checks or checkpoints fail."""
    spec, zoo_root = spec_and_zoo(args)
    problems = check_spec(spec, zoo_root)
    if problems:
        raise SpecError(problems, args.spec or "<embedded pcb-aoi spec>")
    return spec, zoo_root


def add_gpu_arg(p: argparse.ArgumentParser) -> None:
    """--expert-num-gpus: serving and planning both read it (it decides which device's profile entries apply)."""
    p.add_argument("--expert-num-gpus", type=float, default=0.0, help="GPUs per replica of a cuda/auto expert "
                                                                      "(fractions share a GPU; default 0: CPU)")


def add_coe_args(p: argparse.ArgumentParser) -> None:
    """--coe SPEC (repeatable) and --coe-share NAME=SHARE (repeatable): the other CoEs served and their request
    shares."""
    p.add_argument("--coe", action="append", default=[], metavar="SPEC",
                   help="serve this CoE spec too, beside --spec (repeatable; checkpoints in the same --zoo); a request "
                        "names its CoE, else gets its factory's default (the tokens file's `coes:`)")
    p.add_argument("--coe-share", action="append", default=[], type=coe_share, metavar="NAME=SHARE",
                   help="a served CoE's share of the requests, relative (repeatable; a CoE not named: 1): what the "
                        "placement plans the CoEs together for")


def coe_share(text: str) -> tuple[str, float]:
    """NAME=SHARE (a positive number) for --coe-share."""
    name, sep, value = text.partition("=")
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not sep or not name or not share > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=SHARE with a share > 0 (e.g. pcb-lite=0.5)")
    return name, share


#: `--json -`: the JSON goes to standard output, and `cli.main` sends everything else the command prints to standard
#: error, so `expertmesh ... --json - | jq` reads JSON alone.
STDOUT = "-"


def add_json_arg(p: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    p.add_argument("--json", metavar="PATH", help=f"also write {what} as JSON to PATH; '-': to standard output (the "
                                                  "rest of the output then goes to standard error)"
                                                  + (f" (default: {default})" if default else ""))


def emit_json(args: argparse.Namespace, text: str) -> None:
    """Write `text` where `--json` says, if it says: a file, or `-` for standard output."""
    target = args.json
    if not target:
        return
    if str(target) == STDOUT:
        out = getattr(args, "json_stdout", None) or sys.stdout  # cli.main keeps the real stdout here
        out.write(text if text.endswith("\n") else text + "\n")
        out.flush()
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(text)
    print(f"JSON: {target}")


def wants_json_stdout(args: argparse.Namespace) -> bool:
    return getattr(args, "json", None) == STDOUT
