"""`expertmesh station` fails (exit 1) when a request failed or none was answered, against an in-process gRPC
server that speaks the wire contract (no Ray)."""

from __future__ import annotations

import json
import socket
from concurrent import futures

import grpc
import pytest

from expertmesh.cli import main
from expertmesh.station import StationReport
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc


class FakeInspection(pb_grpc.InspectionServiceServicer):
    """Answers every component PASS, or refuses every call with `refuse`."""

    def __init__(self, refuse: grpc.StatusCode | None = None) -> None:
        self.refuse = refuse

    def Inspect(self, request, context):
        if self.refuse is not None:
            context.abort(self.refuse, "refused by the test")
        return pb.InspectResponse(request_id=request.request_id, category="chip_resistor", verdict=pb.PASS,
                                  experts=[pb.ExpertTrace(expert="component_router", reason="router")])

    def InspectBoard(self, request, context):
        if self.refuse is not None:
            context.abort(self.refuse, "refused by the test")
        for i, _ in enumerate(request.components):
            yield pb.InspectResponse(board_id=request.board_id, component_index=i, verdict=pb.PASS)


@pytest.fixture
def server_at():
    servers = []

    def start(servicer: FakeInspection) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_InspectionServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(grace=None)


def station(target: str, tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "station.json"
    rc = main(["station", "--target", target, "--token", "t", "--factory", "factory-a", "--rate", "20",
               "--duration", "0.5", "--board-fraction", "0.3", "--no-progress", "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_a_run_where_every_request_is_answered_exits_0(server_at, tmp_path, capsys):
    rc, figures = station(server_at(FakeInspection()), tmp_path)
    assert rc == 0, capsys.readouterr().out
    assert figures["num_ok"] == figures["num_sent"] >= 5 and figures["errors_by_code"] == {}
    assert figures["p50_ms"] > 0 and "FAILED" not in capsys.readouterr().out


def test_a_failed_request_makes_the_run_fail(server_at, tmp_path, capsys):
    rc, figures = station(server_at(FakeInspection(refuse=grpc.StatusCode.RESOURCE_EXHAUSTED)), tmp_path)
    out = capsys.readouterr().out
    assert rc == 1, out
    assert figures["errors_by_code"] == {"RESOURCE_EXHAUSTED": figures["num_sent"]} and figures["num_ok"] == 0
    assert figures["p50_ms"] is None and "latency: no request answered" in out and "FAILED:" in out


def test_no_server_makes_the_run_fail(tmp_path, capsys):
    with socket_bound() as port:  # a port nothing serves gRPC on
        rc, figures = station(f"127.0.0.1:{port}", tmp_path)
    assert rc == 1 and figures["num_ok"] == 0 and set(figures["errors_by_code"]) == {"UNAVAILABLE"}, figures


@pytest.mark.parametrize("report, failed", [
    (StationReport("t", 1.0, num_sent=10, num_ok=10, num_components=12, p50_ms=3.0, p99_ms=5.0), None),
    (StationReport("t", 1.0, num_sent=10, num_ok=9, errors_by_code={"UNAVAILABLE": 1}), "1 of 10 requests failed"),
    (StationReport("t", 1.0, num_sent=0), "no request was answered (0 sent)"),
])
def test_failure_names_what_went_wrong(report, failed):
    assert report.failure() == failed
    assert ("FAILED: " + failed in report.format()) if failed else "FAILED" not in report.format()


class socket_bound:
    """A bound, never-listening TCP port on loopback (connections to it are refused)."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *_exc) -> None:
        self.sock.close()
