"""Metrics against a real Prometheus: promtool on a live scrape, every dashboard query returns data.

Uses the session's Ray/Serve instance (metrics reported every second, short residency timeouts) and
a `prometheus` process scraping the cluster's nodes on loopback. In CI a missing Prometheus fails
the test (`.ci/run` installs it); elsewhere it skips.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from expertmesh.cluster.prometheus import PrometheusServer
from expertmesh.deployments.dashboard import HIT_RATE_SINCE_START, SHIPPED_PATH, queries
from expertmesh.experts.offline import load_runtime, predict
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.images import encode_png
from expertmesh.experts.spec import load_spec
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc
from serving_fixture import free_port, metric_total

pytestmark = pytest.mark.integration



def _test_cards() -> dict[str, np.ndarray]:
    """Striped and checkered cards: no component, so the router is unsure about some of them."""
    cards = {}
    for period in (2, 3, 4, 8, 10, 16):
        line = (np.arange(96) // period % 2 * 255).astype(np.uint8)
        cards[f"vertical stripes {period}"] = np.tile(line[None, :, None], (96, 1, 3))
        cards[f"horizontal stripes {period}"] = np.tile(line[:, None, None], (1, 96, 3))
        board = ((np.arange(96)[:, None] // period + np.arange(96)[None, :] // period) % 2 * 255).astype(np.uint8)
        cards[f"checkerboard {period}"] = np.repeat(board[:, :, None], 3, 2)
    return cards


@pytest.fixture(scope="module")
def unsure_card(serving) -> bytes:
    """The test card the served router is least sure about, found by running the router offline on the same zoo; it
    must fall below `router.min_confidence` (so it goes to the fallback expert) - which card that is depends on the
    trained weights, so it is measured, not assumed."""
    spec = load_spec(str(serving.spec_path))
    router = load_runtime(spec, spec.expert(spec.router.expert), serving.zoo)
    scored = sorted((predict(router, card[None])[0].score, name, card) for name, card in _test_cards().items())
    score, name, card = scored[0]
    assert score < spec.router.min_confidence, f"the router is sure of every test card (least: {name} at {score:.2f})"
    return encode_png(Image.fromarray(card))


def _require(binary: str) -> None:
    if shutil.which(binary) is None:
        message = f"{binary} is not installed (Debian: apt-get install prometheus; .ci/run does this)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def stub(serving):
    with grpc.insecure_channel(serving.grpc_target) as ch:
        yield pb_grpc.InspectionServiceStub(ch)


@pytest.fixture(scope="module")
def prometheus(serving, tmp_path_factory):
    _require("prometheus")
    prom = PrometheusServer(port=free_port(), scrape_interval_s=1.0, workdir=tmp_path_factory.mktemp("prometheus"))
    prom.start()  # targets: every alive Ray node's metrics export port, read from the live cluster
    yield prom
    prom.stop()


class Traffic:
    """Background station traffic touching every metric: all component types, rules, the fallback (every
    few seconds, so its expert idles out and must be loaded again), bad requests, HTTP and boards.

    Every outcome is kept: the deliberate bad image must be INVALID_ARGUMENT, everything else must be answered;
    anything else lands in `errors` (the test fails on it) instead of being swallowed."""

    def __init__(self, serving, stub, unsure_card: bytes) -> None:
        self.serving, self.stub, self.stop = serving, stub, threading.Event()
        self.unsure_card = unsure_card
        self.auth = (("authorization", f"Bearer {serving.tokens['factory-a']}"),)
        self.fallbacks = self.answered = 0
        self.last_fallback = 0.0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _inspect(self, image: bytes, expect: grpc.StatusCode = grpc.StatusCode.OK, **kw) -> pb.InspectResponse | None:
        try:
            resp = self.stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=image, **kw), metadata=self.auth,
                                     timeout=60)
        except grpc.RpcError as err:
            if err.code() != expect:
                self.errors.append(f"Inspect: {err.code().name} {err.details()}")
            return None
        if expect != grpc.StatusCode.OK:
            self.errors.append(f"Inspect: OK where {expect.name} was expected")
        self.answered += 1
        return resp

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                self._round(i)
            except Exception as exc:  # noqa: BLE001 - a broken round is an error the test reports, not a dead thread
                self.errors.append(f"round {i}: {type(exc).__name__}: {exc}")
            i += 1

    def _round(self, i: int) -> None:
        for comp in generator.COMPONENTS:
            self._inspect(encode_png(generator.generate(comp, "ok" if i % 3 else "solder_bridge", 77, i)))
        self._inspect(encode_png(generator.generate("qfp", "ok", 77, i)), component_hint="qfp", station_id="wave-1")
        self._inspect(b"not an image", expect=grpc.StatusCode.INVALID_ARGUMENT)  # counted for factory-a
        if time.monotonic() - self.last_fallback > 4.0:  # > host_idle_s: the fallback expert is on disk again
            self.last_fallback = time.monotonic()
            r = self._inspect(self.unsure_card)
            self.fallbacks += bool(r and any(t.reason == "fallback" for t in r.experts))
        board = pb.InspectBoardRequest(board_id=f"b{i}", factory_id="factory-b", components=[
            pb.InspectRequest(image=encode_png(generator.generate("chip_resistor", "ok", 78, i * 3 + k))) for k in range(3)])
        try:
            results = list(self.stub.InspectBoard(board, metadata=(
                ("authorization", f"Bearer {self.serving.tokens['factory-b']}"),), timeout=60))
            if len(results) != 3:
                self.errors.append(f"InspectBoard: {len(results)} results for 3 components")
            self.answered += len(results)
        except grpc.RpcError as err:
            self.errors.append(f"InspectBoard: {err.code().name} {err.details()}")
        body = json.dumps({"factory_id": "factory-b", "image": base64.b64encode(
            encode_png(generator.generate("led", "ok", 79, i))).decode()}).encode()
        req = urllib.request.Request(f"{self.serving.http_url}/v1/inspect", data=body, method="POST", headers={
            "authorization": f"Bearer {self.serving.tokens['factory-b']}", "content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                if json.loads(r.read())["experts"]:
                    self.answered += 1
        except OSError as err:  # HTTPError included
            self.errors.append(f"HTTP: {err}")

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


def _promql(expr: str) -> str:
    """A dashboard expression as Grafana would send it, with every variable set to All."""
    expr = re.sub(r"label_values\(([^,]+),\s*(\w+)\)", r"count by (\2) (\1)", expr)
    for var, value in (("$__rate_interval", "30s"), ("$__range", "5m"), ("$expert", ".*"), ("$factory", ".*"), ("$coe", ".*")):
        expr = expr.replace(var, value)
    return expr


def _wait_for(prom: PrometheusServer, expr: str, timeout_s: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = prom.query(expr)
        if rows:
            return rows
        time.sleep(1.0)
    return []


def _labels(rows: list[dict], label: str) -> set[str]:
    return {r["metric"].get(label, "") for r in rows}


def _query_until(prom: PrometheusServer, expr: str, done, timeout_s: float = 30.0) -> list[dict]:
    """The instant query's rows once `done(rows)` holds, else the last rows after `timeout_s` (the test's own
    assertions then say what is missing)."""
    deadline = time.monotonic() + timeout_s
    rows = prom.query(expr)
    while not done(rows) and time.monotonic() < deadline:
        time.sleep(1.0)
        rows = prom.query(expr)
    return rows


def _moved(serving, before: dict[tuple, float], timeout_s: float = 20.0) -> dict[tuple, float]:
    """How far each (metric, labels...) of `before` moved, once all have moved (Ray reports every second) or the
    timeout passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        moved = {key: metric_total(serving.metrics_url, key[0], **dict(key[1:])) - v for key, v in before.items()}
        if all(moved.values()) or time.monotonic() > deadline:
            return moved
        time.sleep(0.5)


def test_cold_expert_waits_for_a_load_then_is_ready(serving, stub):
    """Idle past host_idle_s, every expert on the host is back on disk: the next request waits for loads (its calls of
    the host's experts count as waited_load and a switch, and load them into host memory and onto the device); the one
    right after finds the weights there (ready). Summed over experts: which ones a card reaches depends on the router."""
    auth = (("authorization", f"Bearer {serving.tokens['factory-a']}"),)
    series = [("ray_expertmesh_expert_requests_total", ("readiness", "waited_load")),
              ("ray_expertmesh_expert_requests_total", ("readiness", "ready")),
              ("ray_expertmesh_expert_switches_total",),
              ("ray_expertmesh_expert_loads_total", ("tier", "host")),
              ("ray_expertmesh_expert_loads_total", ("tier", "device"))]
    before = {key: metric_total(serving.metrics_url, key[0], **dict(key[1:])) for key in series}
    time.sleep(4.0)
    req = pb.InspectRequest(factory_id="factory-a", image=encode_png(generator.generate("soic", "ok", 5, 0)))
    cold = stub.Inspect(req, metadata=auth, timeout=60)
    warm = stub.Inspect(req, metadata=auth, timeout=60)
    assert cold.verdict == warm.verdict and [t.label for t in cold.experts] == [t.label for t in warm.experts]
    moved = _moved(serving, before)
    waited, ready, switches, host_loads, device_loads = (moved[key] for key in series)
    assert waited >= 1 and switches >= 1, moved  # the cold request waited for the weights
    assert host_loads >= 1 and device_loads >= 1, moved  # from disk: into host memory, then onto the device
    assert ready >= 1, moved  # the warm one found them there


def test_every_dashboard_query_returns_data_in_prometheus(serving, stub, prometheus, unsure_card):
    dashboard = json.loads(SHIPPED_PATH.read_text())
    with Traffic(serving, stub, unsure_card) as traffic:
        assert _wait_for(prometheus, "ray_expertmesh_requests_total"), "no ExpertMesh metrics reached Prometheus"
        assert _wait_for(prometheus, "sum(ray_expertmesh_expert_switches_total) > 0"), "no switch seen"
        time.sleep(8.0)  # a few scrapes with traffic, so every rate() has two samples in its window
        empty = []
        for title, expr in queries(dashboard):
            if not prometheus.query(_promql(expr)):
                empty.append(f"{title}: {expr}")
    assert not traffic.errors, "traffic errors:\n" + "\n".join(traffic.errors[:20])
    assert traffic.answered > 0 and traffic.fallbacks >= 1, "the test card never reached the fallback expert"
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)

    # on a busy machine a scrape can run past its 1 s interval; Prometheus then marks that target's series stale until
    # the next scrape succeeds, so each instant query below is read until what it checks is there (or 30 s passed)
    hit = {r["metric"]["expert"]: float(r["value"][1]) for r in _query_until(
        prometheus, HIT_RATE_SINCE_START, lambda rows: {"general_defect", "component_classifier"} <= _labels(rows, "expert"))}
    print("hit rates:", {k: round(v, 3) for k, v in sorted(hit.items())})
    assert hit["general_defect"] < 1.0  # it idled out to disk between fallbacks and was loaded again
    assert hit["component_classifier"] > 0.5
    wanted = {("factory-a", "INVALID_ARGUMENT"), ("factory-b", "OK")}
    requests = _query_until(prometheus, "ray_expertmesh_requests_total",
                            lambda rows: wanted <= {(r["metric"]["factory"], r["metric"]["code"]) for r in rows})
    assert wanted <= {(r["metric"]["factory"], r["metric"]["code"]) for r in requests}
    assert _labels(requests, "ingress") == {"grpc", "grpc_board", "http"}
    placement = _query_until(prometheus, "sum by (expert, node) (ray_expertmesh_expert_replicas) > 0",
                             lambda rows: {"component_classifier", "chip_defect", "general_defect"} <= _labels(rows, "expert"))
    assert {r["metric"]["expert"] for r in placement} >= {"component_classifier", "chip_defect", "general_defect"}


def test_promtool_accepts_a_live_scrape(serving):
    _require("promtool")
    text = urllib.request.urlopen(f"http://127.0.0.1:{serving.metrics_port}/metrics", timeout=10).read()
    assert b"ray_expertmesh_requests_total" in text
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    report = (out.stdout + out.stderr).decode()
    assert out.returncode in (0, 3), report  # 3: lint findings; anything else: the exposition did not parse
    assert "error while linting" not in report, report
    ours = [line for line in report.splitlines() if "expertmesh" in line]
    # Ray adds camelCase labels (NodeAddress, SessionName, WorkerId, ...) to every metric; nothing else may be flagged
    assert all("snake_case" in line for line in ours), "\n".join(ours)
