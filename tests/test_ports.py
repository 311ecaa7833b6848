"""The up-front port check of `make run`: which ports each layout binds, and one clear message per taken port."""

from __future__ import annotations

import socket

import pytest

from expertmesh.cluster.ports import WantedPort, bind_probe, main, port_conflicts, run_ports


def free_except(*taken: int):
    return lambda port: port not in taken


def test_three_nodes_bind_the_proxies_every_nodes_metrics_the_dashboard_and_prometheus():
    wanted = run_ports(3)
    assert [w.port for w in wanted] == [9000, 8000, 8080, 8081, 8082, 8265, 9090]
    assert {w.port: w.flag for w in wanted}[8082] == "expertmesh up --metrics-base-port"
    assert {w.port: w.flag for w in wanted}[8265] == "expertmesh up --dashboard-port"


def test_one_node_binds_ray_metrics_through_serve_and_no_dashboard():
    wanted = run_ports(1, grpc_port=9100, http_port=8100, metrics_port=8180, prometheus_port=None)
    assert [(w.port, w.flag) for w in wanted] == [(9100, "expertmesh serve --grpc-port"),
                                                  (8100, "expertmesh serve --http-port"),
                                                  (8180, "expertmesh serve --metrics-port")]
    with pytest.raises(ValueError, match="at least 1"):
        run_ports(0)


def test_all_free_is_no_conflict():
    assert port_conflicts(run_ports(3), free_except()) == []


@pytest.mark.parametrize("port, flag, make_var", [
    (9000, "expertmesh serve --grpc-port", "GRPC_PORT"),
    (8000, "expertmesh serve --http-port", "HTTP_PORT"),
    (8081, "expertmesh up --metrics-base-port", "METRICS_PORT"),
    (8265, "expertmesh up --dashboard-port", "DASHBOARD_PORT"),
    (9090, "expertmesh serve --prometheus-port", "PROMETHEUS_PORT"),
])
def test_a_taken_port_is_named_with_the_flag_that_moves_it(port, flag, make_var):
    problems = port_conflicts(run_ports(3), free_except(port))
    assert len(problems) == 1, problems
    assert f"port {port} " in problems[0] and "already in use" in problems[0]
    assert f"`{flag}`" in problems[0] and f"make run {make_var}=<port>" in problems[0]


def test_every_taken_port_is_reported_in_order():
    problems = port_conflicts(run_ports(3), free_except(8082, 9000))
    assert [p.split()[1] for p in problems] == ["9000", "8082"]


def test_the_same_port_twice_and_a_non_port_are_reported_without_probing_them():
    probed = []

    def probe(port):
        probed.append(port)
        return True

    wanted = run_ports(2, grpc_port=8081, http_port=70000)
    problems = port_conflicts(wanted, probe)
    assert len(problems) == 2, problems
    assert "port 70000" in problems[0] and "not a TCP port" in problems[0] and "--http-port" in problems[0]
    assert "port 8081 is wanted twice" in problems[1] and "Serve's gRPC proxy" in problems[1]
    assert "node-1" in problems[1] and "--metrics-base-port" in problems[1]
    assert sorted(probed) == [8080, 8081, 8265, 9090]  # each valid port once


def test_a_port_without_make_variable_names_only_the_flag():
    problems = port_conflicts([WantedPort(1234, "a test server", "expertmesh x --port")], free_except(1234))
    assert problems and "`expertmesh x --port`" in problems[0] and "make run" not in problems[0]


def test_bind_probe_sees_a_listening_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not bind_probe(port)
    assert bind_probe(port)


def test_main_exits_non_zero_naming_the_taken_port(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["--nodes", "1", "--grpc-port", str(port), "--http-port", "0", "--metrics-port", "0",
                     "--prometheus-port", "0"]) == 1  # 0: not a port, so no other port is probed
    err = capsys.readouterr().err
    assert f"port {port} (Serve's gRPC proxy) is already in use" in err and "GRPC_PORT" in err
    assert "port 0 for Serve's HTTP proxy is not a TCP port" in err
