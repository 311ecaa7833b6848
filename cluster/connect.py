"""How this process reaches Ray: keep a loopback cluster on 127.0.0.1, and join a running cluster as a driver.

Used by the local cluster's supervisor and status (cluster.local) and by `expertmesh serve` (deployments.runner).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType


def keep_ray_on_loopback() -> None:
    """Make a Ray started by this process use 127.0.0.1 for every node address (by default Ray picks the
    machine's network address, even with `_node_ip_address="127.0.0.1"`). Works before or after Ray is imported:
    the environment reaches the processes Ray starts, and an imported Ray's constant is set too."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray then resolves its node address to loopback
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray read the variable at import; it reads the constant when it starts a node
        constants.ENABLE_RAY_CLUSTER = False


def is_loopback(address: str) -> bool:
    return address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "::1")


def connect(address: str) -> ModuleType:
    """Join a running Ray cluster as a driver (a loopback cluster stays on loopback); returns the `ray` module."""
    if is_loopback(address):
        keep_ray_on_loopback()
    # Ray (about 2 s to import) is imported here, not at the top: the CLI commands that never touch a cluster
    # (`--help`, `down`, `plan --nodes N`) stay fast
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    return ray
