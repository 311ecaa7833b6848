"""A README walk-through made real: the user's commands run one after another with the real CLI, each command line
and its whole output printed and kept in a text file (`docs/*-walkthrough.txt`), the demo's folder written `$DEMO`.

`bench/own_data_demo.py` and `bench/real_data_demo.py` each export their dataset and name their commands; this
module runs them (`record`) and gives both the same command line (`main`: `export DIR`, `run DIR [--out F]`).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def record(root: Path, out: Path, *, target: str, script: str, summary: str, steps: list[list[str]],
           timed: bool = False) -> int:
    """Run `steps` (argv lists whose first item is a console script of this environment) with EXPERTMESH_HOME under
    `root`, stopping at the first that fails; write the log to `out`; return the failing exit code, else 0.
    `target`/`script` head the log (the make target and the script that ran it); `timed` adds each command's
    seconds."""
    env = {**os.environ, "EXPERTMESH_HOME": str(root / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
    bin_dir = Path(sys.executable).parent
    log = [f"# `make {target}` ({script} run {root}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
           f"$ python {script} export {root}", summary]
    rc = 0
    for cmd in steps:
        print(f"$ {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([str(bin_dir / cmd[0]), *cmd[1:]], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout).rstrip()  # Ray's log colours
        print(text, flush=True)
        log += [f"$ {shlex.join(cmd)}", text] + ([f"({time.perf_counter() - t0:.0f} s)"] if timed else [])
        if proc.returncode:
            log.append(f"(exit code {proc.returncode})")
            rc = proc.returncode
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(log).replace(str(root), "$DEMO") + "\n")
    print(f"wrote {out}")
    return rc


def main(argv: list[str] | None, *, doc: str, export: Callable[[Path], Path], summary: Callable[[Path], str],
         run: Callable[[Path, Path], int], default_out: Path) -> int:
    """`export DIR` (the dataset and its spec only) or `run DIR [--out F]` (export, then the walk-through)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("dir", type=Path)
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("--out", type=Path, default=default_out)
    args = p.parse_args(argv)
    if args.cmd == "export":
        print(f"wrote {export(args.dir)}\n{summary(args.dir)}")
        return 0
    return run(args.dir, args.out)
