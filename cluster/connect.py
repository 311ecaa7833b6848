"""How this process reaches Ray: keep a loopback cluster on 127.0.0.1, and join a running cluster as a driver.

Used by the local cluster's supervisor and status (cluster.local) and by `expertmesh serve` (deployments.runner).
"""

from __future__ import annotations

import os
import socket
import sys
from types import ModuleType

from expertmesh.errors import Unavailable


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


def _require_listening(address: str, timeout_s: float = 5.0) -> None:
    """Refuse at once an address where nothing listens: Ray's own client retries an absent GCS for minutes."""
    if address in ("auto", "local") or ":" not in address or "://" in address:
        return  # Ray resolves these itself
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as exc:
        raise unreachable(address, str(exc)) from None


def unreachable(address: str, why: str) -> Unavailable:
    """The error for an address where no Ray cluster answers (a runtime failure: exit 1)."""
    return Unavailable(f"no Ray cluster answers at {address} ({why})", field="--address",
                       fix="start one (`expertmesh up`), or pass the address `expertmesh up` or `ray start` printed")


def connect(address: str) -> ModuleType:
    """Join a running Ray cluster as a driver (a loopback cluster stays on loopback); returns the `ray` module."""
    if is_loopback(address):
        keep_ray_on_loopback()
    # Ray (about 2 s to import) is imported here, not at the top: the CLI commands that never touch a cluster
    # (`--help`, `down`, `plan --nodes N`) stay fast
    import ray

    if not ray.is_initialized():
        _require_listening(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, TimeoutError) as exc:  # a runtime failure (exit 1), not a traceback
            raise unreachable(address, f"{type(exc).__name__}: {exc}") from None
    return ray
