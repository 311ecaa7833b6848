"""CPU affinity for the memory benchmark: every system under test runs on the same cores, the driver on the others.

On a 2-core machine a system of two deployments (or two host replicas) would otherwise take both cores where a
one-replica system takes one, and the driver (which generates the requests, checks every answer and follows the
multiplexed baseline's chains) would share the system's core. `runtime_env(cpus)` is the Ray runtime environment that
pins a replica's process - every thread it has and every thread it starts - to `cpus` (Ray's
`worker_process_setup_hook`, with the cores in an environment variable); `pin_this_process` pins the driver.
"""

from __future__ import annotations

import os
from collections.abc import Collection

ENV = "EXPERTMESH_BENCH_CPUS"


def pin_threads(cpus: Collection[int]) -> None:
    """Pin every thread of this process to `cpus` (threads it starts later inherit the affinity)."""
    cpus = set(cpus)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def pin() -> None:
    """The worker setup hook: pin this process to the cores named in $EXPERTMESH_BENCH_CPUS (a comma list)."""
    raw = os.environ.get(ENV, "")
    if raw:
        pin_threads(int(c) for c in raw.split(","))


def runtime_env(cpus: Collection[int] | None) -> dict:
    """The runtime environment that pins a replica to `cpus` (empty for none)."""
    if not cpus:
        return {}
    return {"worker_process_setup_hook": "expertmesh.bench.affinity.pin",
            "env_vars": {ENV: ",".join(str(c) for c in sorted(cpus))}}


def split_cores(num_system_cores: int) -> tuple[list[int], list[int]] | None:
    """(the system's cores, the driver's cores): the last `num_system_cores` of this process's cores for the systems,
    the rest for the driver; None when there are not more cores than that (nothing is pinned then)."""
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(mine) <= num_system_cores:
        return None
    return mine[-num_system_cores:], mine[:-num_system_cores]
