"""Faults under station load on a real 3-node local cluster (hardening issue, item 6).

One cluster, one serve: `expertmesh up --nodes 3`, `expertmesh plan` from the live nodes (60 MiB of expert memory per
node: the plan spreads the experts), `expertmesh serve --plan --replan`. Stations send gRPC requests (every tenth a
board) with a 30 s client deadline, also sent as the server's deadline metadata (`TIMEOUT_HEADER`), for the whole
run, while faults are injected one after another, each once requests are in flight (mid-batch): SIGKILL of an expert
host replica's process, of the router replica's, of the ingress replica's, then a worker node removed. Every request
must end in a result or an explicit retryable status (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED; never
INTERNAL: a request inside the killed ingress once ended INTERNAL from Serve's proxy, and
`cluster.chaos.ingress_died_internal` names that cause), none may hang past its deadline + 10 s or vanish, requests
are answered after the last fault, and the lost node's experts answer again within 80 s (the fast-path issue's
figure before it). The pure parts (schedule, tally, report) are
`cluster/chaos.py`.

The results file: `EXPERTMESH_CHAOS_OUT=bench/results/chaos python -m pytest -s tests/test_chaos.py` writes
bench/results/chaos.json and chaos.md (always printed; written to the test's tmp dir otherwise).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from pathlib import Path

import grpc
import pytest
import yaml
from ray.util.state import list_actors, list_nodes

from expertmesh.bench.provenance import provenance
from expertmesh.cluster.chaos import (HUNG, RequestOutcome, chaos_report, fault_at, format_table, next_fault_due,
                                      recovery_s, violations, NODE_LOSS_BOUND_S)
from expertmesh.cluster.labels import NODE_LABEL
from expertmesh.deployments.deadline import TIMEOUT_HEADER
from expertmesh.deployments.grpc_service import REPLICA_LOST_DETAILS
from expertmesh.deployments.config import INGRESS_DEPLOYMENT, ROUTER_DEPLOYMENT, host_name
from expertmesh.experts.spec import default_spec_path, load_spec
from expertmesh.station import sample_components
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc
from serving_fixture import cli, free_port, stop_serve


DEADLINE_S = 30.0  # each request's client deadline, also sent as the deadline metadata (TIMEOUT_HEADER)
GRACE_S = 10.0  # no status within the deadline + this: the request hung
STATIONS = 3
RATE_PER_STATION = 2.0  # requests/s each (open loop); every 10th a board of 3
MIN_IN_FLIGHT, MAX_BUSY_WAIT_S = 1, 10.0  # a fault waits (at most this long) for this many requests in flight
WARM_S = 12.0  # load before the first fault
PROBE_BOARD_SIZE = 200  # a board still streaming from the ingress when it is killed (a few seconds of work)
MIN_PAUSE_S, MAX_PAUSE_S, SETTLE_S = 15.0, 45.0, 5.0  # between faults (cluster/chaos.py next_fault_due)
AFTER_LAST_S = 20.0  # load after the node loss recovered (at most 80 s after it)


class Stations:
    """STATIONS open-loop stations on their own channels; every request's outcome, on the run's clock."""

    def __init__(self, target: str, token: str) -> None:
        self.target, self.token = target, token
        self.t0 = time.monotonic()
        self.pool = sample_components(64, seed=11, defect_rate=0.3)
        self.focus_pool: list | None = None  # station-0's single requests, after a fault: components needing its experts
        self.lock = threading.Lock()
        self.done: list[RequestOutcome] = []  # finished so far (read live to pace the faults)
        self.sent: list[tuple[float, object]] = []  # (sent_s, future)
        self.stop = threading.Event()
        self.executor = ThreadPoolExecutor(max_workers=96, thread_name_prefix="station")
        self.threads = [threading.Thread(target=self._send_loop, args=(s,), daemon=True) for s in range(STATIONS)]

    def now(self) -> float:
        return time.monotonic() - self.t0

    def focus(self, categories: list[str]) -> None:
        """From now on station-0's single requests carry components of these categories (none: the usual mix), so a
        fault's experts are asked for at once, whatever the plan put where (ok parts: polarity triggers)."""
        self.focus_pool = sample_components(12, seed=13, defect_rate=0.0, mix={c: 1.0 for c in categories}) \
            if categories else None

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _send_loop(self, station: int) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.InspectionServiceStub(channel)
            i, start = 0, time.monotonic() + station / (STATIONS * RATE_PER_STATION)
            while not self.stop.is_set():
                time.sleep(max(0.0, start + i / RATE_PER_STATION - time.monotonic()))
                sent_s = self.now()
                fut = self.executor.submit(self._one, stub, f"station-{station}", i, sent_s)
                with self.lock:
                    self.sent.append((sent_s, fut))
                i += 1
            # the channel closes when every request this station sent has its status (or the grace is over)
            with self.lock:
                mine = [f for _, f in self.sent]
            deadline = time.monotonic() + DEADLINE_S + GRACE_S
            for f in mine:
                try:
                    f.result(timeout=max(0.0, deadline - time.monotonic()))
                except FutureTimeout:
                    break

    def _one(self, stub, station: str, i: int, sent_s: float) -> RequestOutcome:
        metadata = (("authorization", f"Bearer {self.token}"), (TIMEOUT_HEADER, f"{DEADLINE_S:g}"))
        board = i % 10 == 0
        try:
            if board:
                picks = [self.pool[(i + k) % len(self.pool)][2] for k in range(3)]
                out = list(stub.InspectBoard(pb.InspectBoardRequest(
                    board_id=f"{station}-b{i}", factory_id="factory-a", station_id=station,
                    components=[pb.InspectRequest(image=img) for img in picks]), metadata=metadata, timeout=DEADLINE_S))
                if sorted(r.component_index for r in out) != [0, 1, 2]:
                    o = RequestOutcome("OK_BUT_SHORT", sent_s, self.now() - sent_s, station, board,
                                       details=f"{len(out)} of 3 results")
                else:
                    o = RequestOutcome("OK", sent_s, self.now() - sent_s, station, board,
                                       frozenset(t.expert for r in out for t in r.experts))
            else:
                pool = self.focus_pool if self.focus_pool and station == "station-0" else self.pool
                resp = stub.Inspect(pb.InspectRequest(request_id=f"{station}-{i}", factory_id="factory-a",
                                                      station_id=station, image=pool[i % len(pool)][2]),
                                    metadata=metadata, timeout=DEADLINE_S)
                o = RequestOutcome("OK", sent_s, self.now() - sent_s, station, board,
                                   frozenset(t.expert for t in resp.experts))
        except grpc.RpcError as err:
            o = RequestOutcome(err.code().name, sent_s, self.now() - sent_s, station, board,
                               details=err.details() or "")
        with self.lock:
            self.done.append(o)
        return o

    def finish(self) -> tuple[int, list[RequestOutcome]]:
        """Stop sending; every request's outcome, HUNG for one without a status by its deadline + the grace."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        with self.lock:
            sent = list(self.sent)
        outcomes = []
        for sent_s, fut in sent:
            wait_s = sent_s + DEADLINE_S + GRACE_S - self.now()
            try:
                outcomes.append(fut.result(timeout=max(0.0, wait_s)))
            except FutureTimeout:
                outcomes.append(RequestOutcome(HUNG, sent_s, self.now() - sent_s, details="no status"))
        self.executor.shutdown(wait=False, cancel_futures=True)
        return len(sent), outcomes

    def in_flight(self) -> int:
        with self.lock:
            return len(self.sent) - len(self.done)

    def live(self) -> list[RequestOutcome]:
        with self.lock:
            return list(self.done)


def serve_replicas(dashboard: str) -> list:
    """Alive Serve replica actors (class_name `ServeReplica:<app>:<deployment>`)."""
    return [a for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=10000, detail=True)
            if a.class_name.startswith("ServeReplica:")]


def kill_replica(dashboard: str, deployment: str) -> str:
    """SIGKILL the process of `deployment`'s (first) replica; its actor name and pid."""
    replicas = [a for a in serve_replicas(dashboard) if a.class_name.split(":")[-1] == deployment]
    assert replicas, (deployment, [a.class_name for a in serve_replicas(dashboard)])
    victim = sorted(replicas, key=lambda a: a.name or "")[0]
    os.kill(victim.pid, signal.SIGKILL)
    return f"{victim.name} (pid {victim.pid})"


def assert_dead(dashboard: str, target: str, timeout_s: float = 30.0) -> None:
    """The killed replica's actor is no longer alive (the fault really happened)."""
    name = target.split(" ")[0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not [a for a in serve_replicas(dashboard) if a.name == name]:
            return
        time.sleep(1)
    raise AssertionError(f"{target} is still alive {timeout_s:g} s after SIGKILL")


@pytest.mark.integration
@pytest.mark.slow
def test_faults_under_station_load_end_every_request_explicitly(tmp_path, default_zoo):
    env = {**os.environ, "EXPERTMESH_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    zoo = ["--zoo", str(default_zoo)]
    profile = default_zoo / "profile.json"
    if not profile.exists():  # `expertmesh profile` writes it there; measured briefly when missing
        profile = tmp_path / "profile.json"
        out = cli(env, "profile", *zoo, "--out", str(profile), "--runs", "3", "--max-batch", "8", "--usage", "spec",
                  "--no-progress", "--plot", str(tmp_path / "p.png"))
        assert out.returncode == 0, out.stderr[-2000:]
    up = cli(env, "up", "--nodes", "3", "--node-memory-gb", "0.06", "--metrics-base-port", str(free_port()),
             "--dashboard-port", str(free_port()))
    serve = None
    serve_lines: list[str] = []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((tmp_path / "cluster" / "state.json").read_text())
        plan_path = tmp_path / "plan.json"
        out = cli(env, "plan", *zoo, "--profile", str(profile), "--json", str(plan_path))
        assert out.returncode == 0, out.stderr[-2000:]
        planned = json.loads(plan_path.read_text())["replicas"]
        classifier = load_spec(default_spec_path()).router.expert
        planned_nodes = sorted({n for ns in planned.values() for n in ns})
        hosted = {n: sorted(e for e, ns in planned.items() if n in ns and e != classifier) for n in planned_nodes}
        alone = {n: [e for e in hosted[n] if planned[e] == [n]] for n in planned_nodes}  # held nowhere else
        spec = load_spec(default_spec_path())

        def needing(expert: str) -> list[str]:
            """Categories whose requests call `expert`: by the table, or by a likely trigger (polarity); an expert
            only a rare trigger or the fallback calls (solder_fine, general_defect) cannot be asked for at will."""
            ups = {d.upstream for d in spec.dependencies if d.downstream == expert and d.trigger_probability >= 0.5}
            return sorted({c.name for c in spec.categories if expert in c.experts or ups & set(c.experts)})
        targetable = {n: [e for e in alone[n] if needing(e)] for n in planned_nodes}
        assert len([n for n in hosted if hosted[n]]) >= 2, planned  # the memory forces a real partition
        grpc_port = free_port()
        serve = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", "serve", *zoo, "--address", state["address"],
                                  "--profile", str(profile), "--plan", str(plan_path), "--grpc-port", str(grpc_port),
                                  "--http-port", str(free_port()), "--no-prometheus", "--duration", "900", "--replan"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: serve_lines.extend(serve.stdout), daemon=True).start()

        # ready: an expert host on every planned node, then a request answered
        dashboard = state["dashboard"]
        want = {host_name(n) for n in planned_nodes if hosted[n]} | {ROUTER_DEPLOYMENT, INGRESS_DEPLOYMENT}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert serve.poll() is None, "".join(serve_lines)[-3000:]
            running = {a.class_name.split(":")[-1] for a in serve_replicas(dashboard)}
            if want <= running:
                break
            time.sleep(3)
        assert want <= running, (want, running, "".join(serve_lines)[-3000:])
        token = next(t for t, f in yaml.safe_load((tmp_path / "dev-tokens.yaml").read_text()).items()
                     if f == "factory-a")
        target = f"127.0.0.1:{grpc_port}"
        probe = sample_components(1, seed=3, defect_rate=0.0)[0][2]
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InspectionServiceStub(channel)
            deadline, answered = time.monotonic() + 180, False
            while time.monotonic() < deadline and not answered:
                try:
                    stub.Inspect(pb.InspectRequest(factory_id="factory-a", image=probe),
                                 metadata=(("authorization", f"Bearer {token}"),), timeout=30)
                    answered = True
                except grpc.RpcError:
                    time.sleep(2)
        assert answered, "".join(serve_lines)[-3000:]

        # who gets hurt: the node lost is the worker holding the most experts (not the router's or ingress's, when
        # another will do); the expert host killed is on another planned node (the head's when it has one)
        where = {a.class_name.split(":")[-1]: a for a in serve_replicas(dashboard)}
        names = {n.node_id: (n.labels or {}).get(NODE_LABEL) for n in list_nodes(address=dashboard)}
        front = {names.get(where[d].node_id) for d in (ROUTER_DEPLOYMENT, INGRESS_DEPLOYMENT)}
        workers = [n for n in planned_nodes if n != "node-0" and targetable[n]]
        assert workers, hosted
        victim = max(workers, key=lambda n: (n not in front, len(targetable[n]), n))
        host_node = next((n for n in ["node-0", *planned_nodes] if n != victim and targetable.get(n)), None)
        assert host_node is not None, hosted

        # the run: load throughout, the faults one after another
        stations = Stations(target, token)
        stations.start()
        time.sleep(WARM_S)
        faults = []
        injections = [("expert_host", lambda: kill_replica(dashboard, host_name(host_node)), targetable[host_node]),
                      ("router", lambda: kill_replica(dashboard, ROUTER_DEPLOYMENT), ()),
                      ("ingress", lambda: kill_replica(dashboard, INGRESS_DEPLOYMENT), ()),
                      ("node", lambda: _remove(env, victim), targetable[victim])]
        for kind, inject, experts in injections:
            if faults:
                last = faults[-1]
                while not next_fault_due(last.at_s, recovery_s(stations.live(), last), stations.now(),
                                         min_pause_s=MIN_PAUSE_S, max_pause_s=MAX_PAUSE_S, settle_s=SETTLE_S):
                    time.sleep(0.5)
            if kind == "ingress":  # a board streaming from inside the ingress when it dies: its end is checked
                probe = ProbeBoard(target, token)
                probe.streaming.wait(60)
            busy_by = time.monotonic() + MAX_BUSY_WAIT_S  # strike while requests are in flight (mid-batch)
            while stations.in_flight() < MIN_IN_FLIGHT and time.monotonic() < busy_by:
                time.sleep(0.005)
            at_s = stations.now()
            what = inject()
            if kind == "node":  # the node counts as lost once it is gone (as in tests/test_local_cluster.py)
                gone_s = stations.now()
                what, at_s = f"{what} (removal asked at {at_s:.1f} s, gone after {gone_s - at_s:.1f} s)", gone_s
            faults.append(fault_at(kind, what, at_s, experts))
            stations.focus(sorted({c for e in experts for c in needing(e)}))
            print(f"{at_s:6.1f} s: {kind} fault: {what}", flush=True)
            if kind != "node":
                assert_dead(dashboard, what)
        node_loss = faults[-1]
        while stations.now() < node_loss.at_s + NODE_LOSS_BOUND_S:
            rec = recovery_s(stations.live(), node_loss)
            if rec is not None and stations.now() >= node_loss.at_s + rec + AFTER_LAST_S:
                break
            time.sleep(0.5)
        num_sent, outcomes = stations.finish()
        probe.thread.join(DEADLINE_S + GRACE_S)
        print(f"board inside the killed ingress: {probe.streamed} results, then {probe.code}: {probe.details}", flush=True)
        # the one request sure to be inside the ingress when it died: retryable UNAVAILABLE, never the proxy's INTERNAL
        assert (probe.code, probe.details) == ("UNAVAILABLE", REPLICA_LOST_DETAILS), (probe.code, probe.details)

        report = chaos_report(num_sent, outcomes, faults)
        table = format_table(report)
        print(f"\n{num_sent} requests from {STATIONS} stations at {STATIONS * RATE_PER_STATION:g}/s, deadline "
              f"{DEADLINE_S:g} s; the slowest took {report.slowest_s:.1f} s\n{table}", flush=True)
        doc = {"provenance": provenance(), "scenario": {
            "nodes": 3, "node_memory_gb": 0.06, "stations": STATIONS, "rate_per_s": STATIONS * RATE_PER_STATION,
            "board_every": 10, "board_size": 3, "deadline_s": DEADLINE_S, "hung_after_s": DEADLINE_S + GRACE_S,
            "plan": planned, "node_lost": victim, "expert_host_killed_on": host_node,
            "command": "EXPERTMESH_CHAOS_OUT=bench/results/chaos python -m pytest -s tests/test_chaos.py"},
            **report.to_dict()}
        prefix = Path(os.environ.get("EXPERTMESH_CHAOS_OUT") or tmp_path / "chaos")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        prefix.with_suffix(".md").write_text(
            f"# Faults under station load (tests/test_chaos.py)\n\nCommit {doc['provenance']['commit']}"
            f"{' (dirty tree)' if doc['provenance']['worktree_dirty'] else ''}, {doc['provenance']['date']}; "
            f"{num_sent} requests from {STATIONS} stations at {STATIONS * RATE_PER_STATION:g} requests/s, client "
            f"deadline {DEADLINE_S:g} s (hung: no status after {DEADLINE_S + GRACE_S:g} s). Times are seconds since "
            f"the load started; recovery is to the first answer of a request sent after the fault that needed the "
            f"fault's experts (those the plan holds only on the killed host's node, or only on the lost node; any "
            f"answer for the router and the ingress).\n\n"
            f"{table}\n")
        problems = violations(report, outcomes, faults)
        assert not problems, "\n".join(problems) + "\n" + "".join(serve_lines)[-3000:]
        leaked = [o.details for o in outcomes if any(s in o.details for s in ("Traceback", 'File "'))]
        assert not leaked, f"{len(leaked)} errors carry a stack trace, e.g. {leaked[0][:500]}"
    finally:
        stop_serve(serve, env)


class ProbeBoard:
    """One large board, sent at once: `streaming` is set at its first result; `code`/`details` are its end."""

    def __init__(self, target: str, token: str) -> None:
        self.streaming, self.streamed, self.code, self.details = threading.Event(), 0, None, ""
        images = [part.image for part in sample_components(20, seed=7, defect_rate=0.2)]
        self.request = pb.InspectBoardRequest(board_id="probe", factory_id="factory-a", components=[
            pb.InspectRequest(image=images[i % len(images)]) for i in range(PROBE_BOARD_SIZE)])
        self.target, self.token = target, token
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        metadata = (("authorization", f"Bearer {self.token}"), (TIMEOUT_HEADER, f"{DEADLINE_S:g}"))
        try:
            with grpc.insecure_channel(self.target) as channel:
                for _ in pb_grpc.InspectionServiceStub(channel).InspectBoard(self.request, metadata=metadata,
                                                                             timeout=DEADLINE_S):
                    self.streamed += 1
                    self.streaming.set()
            self.code = "OK"
        except grpc.RpcError as err:
            self.code, self.details = err.code().name, err.details()
        self.streaming.set()


def _remove(env: dict, node: str) -> str:
    out = cli(env, "node", "remove", node, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return node


# ------------------------------------------------------------------ the pure parts (cluster/chaos.py), no Ray
def _o(code: str, sent_s: float, seconds: float, experts=()) -> RequestOutcome:
    return RequestOutcome(code, sent_s, seconds, experts=frozenset(experts))


def test_the_report_counts_each_phase_and_times_each_recovery():
    faults = [fault_at("expert_host", "Host-node-0", 10.0, ["chip_defect"]), fault_at("router", "Router", 30.0),
              fault_at("node", "node-1", 50.0, ["qfp_defect"])]
    outcomes = [_o("OK", 1, 0.5), _o("UNAVAILABLE", 9.5, 1.0), _o("OK", 11, 0.5, ["diode_defect"]),
                _o("OK", 12, 3.0, ["chip_defect"]), _o("DEADLINE_EXCEEDED", 31, 30.0), _o("OK", 33, 2.0),
                _o("RESOURCE_EXHAUSTED", 51, 0.1), _o("OK", 52, 1.0, ["diode_defect"]),
                _o("OK", 60, 4.0, ["qfp_defect"])]
    report = chaos_report(len(outcomes), outcomes, faults)
    assert report.counts == {"DEADLINE_EXCEEDED": 1, "OK": 6, "RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 1}
    assert report.counts_by_phase == {"before": {"OK": 1, "UNAVAILABLE": 1}, "expert_host": {"OK": 2},
                                      "router": {"DEADLINE_EXCEEDED": 1, "OK": 1},
                                      "node": {"OK": 2, "RESOURCE_EXHAUSTED": 1}}
    # recovery: the first answer sent after the fault that needed its experts (any answer for the router)
    assert [r["recovery_s"] for r in report.faults] == [5.0, 5.0, 14.0]
    # failures that ended between a fault and the next: the UNAVAILABLE sent before the host fault ended after it
    assert [r["in_flight"] for r in report.faults] == [{"UNAVAILABLE": 1}, {}, {"DEADLINE_EXCEEDED": 1}]
    assert [r["failures_after"] for r in report.faults] == [{"UNAVAILABLE": 1}, {}, {"DEADLINE_EXCEEDED": 1,
                                                                                   "RESOURCE_EXHAUSTED": 1}]
    assert violations(report, outcomes, faults) == []
    table = format_table(report)
    assert "| node | node-1 | 50.0 | 14.0 | DEADLINE_EXCEEDED 1 | DEADLINE_EXCEEDED 1, RESOURCE_EXHAUSTED 1 |" in table
    assert "| all | 6 | 1 | 1 | 1 | 9 |" in table


def test_violations_name_what_went_wrong():
    faults = [fault_at("ingress", "Ingress", 10.0), fault_at("node", "node-2", 20.0, ["qfp_defect"])]
    outcomes = [_o("OK", 1, 1), _o("INTERNAL", 11, 1), _o(HUNG, 12, 40), _o("OK", 25, 90, ["qfp_defect"]),
                _o("UNAVAILABLE", 30, 1)]
    report = chaos_report(7, outcomes, faults)
    problems = "\n".join(violations(report, outcomes, faults))
    assert "2 of 7 requests vanished" in problems
    assert "1 requests hung" in problems
    assert "'INTERNAL': 1" in problems  # not in flight at the ingress fault: not the known proxy gap
    # Serve's proxy's INTERNAL for a request in flight inside the killed ingress: still a violation, its cause named
    died = RequestOutcome("INTERNAL", 9.5, 1.0, details="The actor died unexpectedly before finishing this task.\n"
                                                        "\tclass_name: ServeReplica:expertmesh:Ingress")
    after = [_o("OK", 21, 1), died]
    report = chaos_report(2, after, faults)
    assert report.known_internal == 1
    assert "1 of them Serve's proxy's INTERNAL for a request inside the killed ingress" in violations(
        report, after, faults)[0]
    assert "no answer after the ingress fault" not in problems  # answered at 25 + 90
    assert "after 95.0 s, over the 80 s bound" in problems
    assert violations(chaos_report(1, [_o("UNAVAILABLE", 21, 1)], faults), [_o("UNAVAILABLE", 21, 1)], faults)[0] \
        == "no request sent after the last fault was answered"


def test_the_next_fault_waits_for_recovery_within_bounds():
    due = lambda now, rec: next_fault_due(10.0, rec, now, min_pause_s=15, max_pause_s=45, settle_s=5)  # noqa: E731
    assert not due(20.0, 1.0)  # before the minimum pause
    assert due(25.0, 1.0)  # recovered at 11, settled by 16, minimum pause over
    assert not due(30.0, 18.0) and due(33.0, 18.0)  # recovered at 28: settled at 33
    assert not due(40.0, None) and due(55.0, None)  # never recovered: the maximum pause
    with pytest.raises(ValueError):
        fault_at("disk", "x", 1.0)
