"""The TCP ports `make run` binds, checked before anything starts: each one taken is named with what wants it and
the flag (and `make run` variable) that moves it.

Pure: `run_ports(...)` lists the ports of a `make run` layout, and `port_conflicts(wanted, is_free)` takes those and
a probe (port -> free?) and returns one message per problem (a port in use, the same port wanted twice, a number
that is not a port). Glue: `bind_probe` tries to bind each port; `free_port` asks the OS for a free one; `main` is what the Makefile runs
(`python -m expertmesh.cluster.ports ...`, exit 1 with the messages on stderr when any port is taken).

Ray's own ports are not listed: the GCS, raylets and workers take free ports Ray picks itself.
"""

from __future__ import annotations

import argparse
import errno
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

MAX_PORT = 65535


@dataclass(frozen=True)
class WantedPort:
    """A port a command will bind, what binds it, and how to move it."""

    port: int
    what: str  # e.g. "Serve's gRPC proxy"
    flag: str  # the expertmesh flag that sets it, e.g. "expertmesh serve --grpc-port"
    make_var: str = ""  # the `make run` variable that passes the flag, e.g. "GRPC_PORT"

    def how_to_move(self) -> str:
        via_make = f"`make run {self.make_var}=<port>`, which passes " if self.make_var else ""
        return f"{via_make}`{self.flag}`"


def run_ports(num_nodes: int, grpc_port: int = 9000, http_port: int = 8000, metrics_port: int = 8080,
              dashboard_port: int = 8265, prometheus_port: int | None = 9090) -> list[WantedPort]:
    """The ports `make run` binds for `num_nodes` nodes. One node: `expertmesh serve` starts Ray here, whose metrics
    go on `metrics_port`. More: `expertmesh up` starts the nodes, node i's metrics on `metrics_port` + i, Ray's
    dashboard on the head; `expertmesh serve --address local` then binds the proxies. `prometheus_port` None: no
    local Prometheus (not installed)."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
    wanted = [WantedPort(grpc_port, "Serve's gRPC proxy", "expertmesh serve --grpc-port", "GRPC_PORT"),
              WantedPort(http_port, "Serve's HTTP proxy", "expertmesh serve --http-port", "HTTP_PORT")]
    if num_nodes == 1:
        wanted.append(WantedPort(metrics_port, "Ray's metrics export", "expertmesh serve --metrics-port", "METRICS_PORT"))
    else:
        wanted += [WantedPort(metrics_port + i, f"node-{i}'s metrics export (base + {i})",
                              "expertmesh up --metrics-base-port", "METRICS_PORT") for i in range(num_nodes)]
        wanted.append(WantedPort(dashboard_port, "Ray's dashboard on the head node", "expertmesh up --dashboard-port",
                                 "DASHBOARD_PORT"))
    if prometheus_port is not None:
        wanted.append(WantedPort(prometheus_port, "the local Prometheus", "expertmesh serve --prometheus-port",
                                 "PROMETHEUS_PORT"))
    return wanted


def port_conflicts(wanted: list[WantedPort], is_free: Callable[[int], bool]) -> list[str]:
    """One message per problem, in the order of `wanted`: a number outside 1-65535, a port wanted twice, a port in
    use (`is_free(port)` False). Each names the port, what wants it, and the flag that moves it. Empty: all clear."""
    problems: list[str] = []
    first: dict[int, WantedPort] = {}
    for w in wanted:
        if not 1 <= w.port <= MAX_PORT:
            problems.append(f"port {w.port} for {w.what} is not a TCP port (1-{MAX_PORT}): "
                            f"pick one with {w.how_to_move()}")
        elif w.port in first:
            problems.append(f"port {w.port} is wanted twice, by {first[w.port].what} and by {w.what}: "
                            f"move one, e.g. with {w.how_to_move()}")
        else:
            first[w.port] = w
            if not is_free(w.port):
                problems.append(f"port {w.port} ({w.what}) is already in use (or not open to this user): stop what "
                                f"holds it (`ss -ltnp 'sport = :{w.port}'` shows it) or pick another with "
                                f"{w.how_to_move()}")
    return problems


# ------------------------------------------------------------------ glue
def bind_probe(port: int) -> bool:
    """True when nothing listens on `port` on any IPv4 or IPv6 address: a bind to the wildcard address succeeds
    (SO_REUSEADDR, so connections in TIME_WAIT do not count). Other bind errors (e.g. no IPv6) count as free."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this machine
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it): for tests and benchmarks that start servers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expertmesh.cluster.ports",
                                     description="check that the ports `make run` binds are free")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--grpc-port", type=int, default=9000)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8080, help="one node: Ray's; more: node i's is this + i")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--prometheus-port", type=int, default=9090, help="checked when prometheus is installed")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes must be at least 1, got {args.nodes}")
    prometheus = args.prometheus_port if shutil.which("prometheus") else None
    wanted = run_ports(args.nodes, args.grpc_port, args.http_port, args.metrics_port, args.dashboard_port, prometheus)
    problems = port_conflicts(wanted, bind_probe)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ports free: {', '.join(str(w.port) for w in wanted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
