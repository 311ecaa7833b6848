"""Where a benchmark's results were measured: the commit of the source tree this code runs from (and whether it had
uncommitted changes), the date and the machine, with its load average (the machines are shared). Every results file
(`expertmesh bench throughput`, `memory`, `simulate`) starts with this."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent


def provenance() -> dict:
    """The commit measured, the machine, the date."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(SOURCE_ROOT), *a], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None, "worktree_dirty": bool(git("status", "--porcelain")),
            "source": str(SOURCE_ROOT), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "load_average_1_5_15m": list(os.getloadavg())}}
