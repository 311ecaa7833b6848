"""Several CoEs planned together (no Ray): the joint usage mixes the CoEs by request share, an expert two CoEs share is
one key placed once, another CoE's unprofiled expert is estimated from the profiled ones, the deployment options host,
pin and dedicate every CoE's keys, and `expertmesh plan --coe` plans them."""

from __future__ import annotations

import json

import pytest
import yaml

from expertmesh.cli import main
from expertmesh.cluster.demand import ServedCoE, estimated_costs, joint_problem, joint_usage, per_item_s
from expertmesh.cluster.observed import observed_usage
from expertmesh.cluster.placement import NodeCapacity, plan
from expertmesh.cluster.served import served_demand
from expertmesh.cluster.costs import ExpertCost
from expertmesh.cluster.rollout import RolloutState
from expertmesh.deployments.config import ExecutorPlan, ServeSettings, dedicated_name, deployment_options, host_name
from expertmesh.deployments.served import served_placement
from expertmesh.errors import InvalidArgument
from expertmesh.experts.checkpoint_header import WEIGHTS_FILE, checkpoint_bytes
from expertmesh.experts.revisions import RevisionSet
from expertmesh.experts.spec import resolve_checkpoint
from expertmesh.profiler.store import EdgeWeight, ProfileStore, UsageProfile, checkpoint_sha256, current_versions, device_name
from expertmesh.profiler.usage import from_spec
from expertmesh.rollout_command import format_comparisons
from conftest import lite_spec_data
from test_profiler import _profile

MIB = 2**20


def usage(probabilities: dict[str, float], edges: tuple = ()) -> UsageProfile:
    return UsageProfile(source="spec", num_requests=0, usage=probabilities,
                        edges=[EdgeWeight(upstream=u, downstream=d, kind="table", probability=p) for u, d, p in edges])


def test_joint_usage_mixes_the_coes_by_their_request_shares(default_spec):
    a = ServedCoE(default_spec, 3.0, usage({"clf": 1.0, "x": 0.5, "shared": 0.2}, [("clf", "x", 0.5)]))
    b = ServedCoE(default_spec, 1.0, usage({"clf2": 1.0, "shared": 1.0}, [("clf2", "shared", 1.0)]))
    joint = joint_usage([a, b])
    assert joint.usage == pytest.approx({"clf": 0.75, "clf2": 0.25, "shared": 0.75 * 0.2 + 0.25, "x": 0.375})
    assert {(e.upstream, e.downstream): e.probability for e in joint.edges} == pytest.approx(
        {("clf", "x"): 0.375, ("clf2", "shared"): 0.25})


def test_an_unprofiled_expert_is_estimated_from_the_profiled_ones():
    profiled = {n: ExpertCost(name=n, weights_bytes=w, activation_bytes=w // 4, k_ms_per_item=w / 1e6, b_ms_per_batch=0,
                              batch_size=8, switch_ms=0, calls_per_s=0) for n, w in (("a", 1_000_000), ("b", 3_000_000))}
    est = estimated_costs({"new": 2_000_000}, {"new": 16}, profiled)["new"]
    assert (est.weights_bytes, est.activation_bytes, est.batch_size) == (2_000_000, 500_000, 16)
    assert per_item_s(est) == pytest.approx(2_000_000 * 1e-9)  # their median: 1 ms per MB
    bare = estimated_costs({"new": 2_000_000}, {"new": 16}, {})["new"]  # nothing profiled: the constants
    assert bare.activation_bytes == 1_000_000


@pytest.fixture(scope="module")
def lite(default_zoo, tmp_path_factory):
    """pcb-lite with its own expert (lite_solder), and a profile store measuring every pcb-aoi expert only."""
    d = tmp_path_factory.mktemp("joint")
    path = d / "pcb-lite.yaml"
    path.write_text(yaml.safe_dump(lite_spec_data(own_expert=True), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def store(default_spec, default_zoo, lite):
    s = ProfileStore(spec=default_spec.name, usage=from_spec(default_spec))
    for e in default_spec.experts:
        p = _profile(expert=e.name, sha=checkpoint_sha256(resolve_checkpoint(e, default_zoo)))
        s.put(p.model_copy(update={"versions": current_versions(), "device_name": device_name("cpu"),
                                   "footprint_bytes": checkpoint_bytes(resolve_checkpoint(e, default_zoo) / WEIGHTS_FILE)}))
    s.save(lite.parent / "profile.json")
    return s


def test_served_demand_keys_every_coe_shares_what_is_identical_and_estimates_the_rest(default_spec, default_zoo, lite,
                                                                                     store):
    demand = served_demand(None, default_zoo, [str(lite)], store, shares={"pcb-lite": 0.5})
    own = next(k for k in demand.keys if k.startswith("lite_solder@"))
    base = [e.name for e in default_spec.experts]
    # the router and lite_inspector are pcb-aoi's experts byte for byte: one key each; lite_solder is its own
    assert demand.keys == [*base, own] and "lite_inspector" not in demand.keys
    assert demand.profiled == frozenset(base) and not demand.fully_profiled
    assert demand.costs[own].weights_bytes == checkpoint_bytes(resolve_checkpoint(default_spec.expert("solder_fine"),
                                                                                  default_zoo) / WEIGHTS_FILE)
    assert [c.share for c in demand.coes] == [1.0, 0.5]
    # general_defect serves both CoEs: pcb-aoi's fallback share plus every pcb-lite request (2/3 and 1/3 of traffic)
    lite_usage = demand.coes[1].usage.usage
    assert lite_usage["general_defect"] == pytest.approx(1.0)
    assert demand.usage.usage["general_defect"] == pytest.approx(
        2 / 3 * store.usage.usage["general_defect"] + 1 / 3 * 1.0)
    assert demand.usage.usage[own] == pytest.approx(1 / 3 * lite_usage[own]) and lite_usage[own] > 0

    nodes = [NodeCapacity(name=f"node-{i}", memory_bytes=64 * MIB, cpus=4) for i in range(2)]
    problem = joint_problem(demand.coes, demand.costs, nodes, 20.0)
    assert [e.name for e in problem.experts] == demand.keys
    assert [e.name for e in problem.experts if e.everywhere] == [default_spec.router.expert]  # one classifier key
    result = plan(problem)
    assert set(result.replicas) == set(demand.keys) and result.replicas[own]

    with pytest.raises(InvalidArgument, match="not served") as err:
        served_demand(None, default_zoo, [str(lite)], store, shares={"pcb-nope": 1.0})
    assert err.value.field == "coe_request_shares"


def test_deployment_options_host_pin_and_dedicate_another_coes_keys(default_spec, default_zoo, lite):
    keyed = RevisionSet(None, default_zoo).get(str(lite)).spec
    own = next(e.name for e in keyed.experts if e.name.startswith("lite_solder@"))
    placement = {e.name: ["node-0"] for e in default_spec.experts} | {own: ["node-1"]}
    executors = {"node-1": ExecutorPlan(num_replicas=0, device_budget_bytes=0, dedicated={
        own: {"min_replicas": 1, "max_replicas": 2, "device_budget_bytes": 8 * MIB}})}
    opts = deployment_options(default_spec, ServeSettings(), placement=placement, others=[keyed])
    assert own in opts[host_name("node-1")]["user_config"]["experts"]
    assert own not in opts[host_name("node-0")]["user_config"]["experts"]
    assert opts[host_name("node-1")]["user_config"]["max_batch"][own] == keyed.expert(own).max_batch
    assert opts[host_name("node-1")]["user_config"]["usage"][own] > 0  # the pools rank it by its CoE's mix
    assert opts["Router"]["user_config"]["homes"][own] == "node-1"
    dedicated = deployment_options(default_spec, ServeSettings(), placement=placement, executors=executors,
                                   others=[keyed])
    assert dedicated_name(own, "node-1") in dedicated and host_name("node-1") not in dedicated
    assert dedicated["Router"]["user_config"]["dedicated"] == {own: {"node-1": dedicated_name(own, "node-1")}}
    with pytest.raises(InvalidArgument, match="do not have: " + own.replace("@", ".")) as err:
        deployment_options(default_spec, ServeSettings(), placement=placement)  # without the other CoE
    assert err.value.field == "placement"


def test_the_router_classifiers_of_every_coe_count_the_requests():
    calls = {("clf", "router"): 30.0, ("clf2", "router"): 10.0, ("x", "table"): 20.0}
    usage_seen, requests = observed_usage(calls, {"clf", "clf2"})
    assert requests == 40 and usage_seen["x"] == pytest.approx(0.5)
    # the controllers count every classifier's: one a live change brings in is counted as well
    assert observed_usage({**calls, ("clf@v2", "router"): 10.0})[1] == 50


def test_plan_command_plans_several_coes_together(default_zoo, lite, store, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", "--zoo", str(default_zoo), "--profile", str(lite.parent / "profile.json"), "--coe", str(lite),
                 "--coe-share", "pcb-lite=0.5", "--nodes", "2", "--node-memory-gb", "0.06", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "pcb-aoi + pcb-lite on 2 nodes" in printed.out
    assert "estimated from their checkpoints (no current profile): lite_solder@" in printed.err
    replicas = json.loads(out.read_text())["replicas"]
    assert any(k.startswith("lite_solder@") for k in replicas) and "lite_inspector" not in replicas
    with pytest.raises(SystemExit):
        main(["plan", "--zoo", str(default_zoo), "--coe", str(lite), "--coe-share", "pcb-lite=0"])
    assert "NAME=SHARE with a share > 0" in capsys.readouterr().err


def test_a_stored_placement_keeps_only_what_the_app_serves(default_spec, default_zoo, lite):
    """A placement stored for an earlier config (a CoE since removed, an expert since retrained) never stops the app
    from building: what it no longer serves is left out, and the controller places what is missing."""
    keyed = RevisionSet(None, default_zoo).get(str(lite)).spec
    own = next(e.name for e in keyed.experts if e.name.startswith("lite_solder@"))
    stored = {"chip_defect": ["node-0"], own: ["node-1"], "gone@00000000": ["node-1"]}
    assert served_placement(stored, default_spec, [keyed]) == ({"chip_defect": ["node-0"], own: ["node-1"]},
                                                                ["gone@00000000"])
    assert served_placement(stored, default_spec, [])[1] == ["gone@00000000", own]  # pcb-lite no longer served


def test_rollout_status_marks_each_coes_own_running_canary():
    running = RolloutState(revision=2, canary={"spec": "/v2.yaml", "factory": "factory-b", "share": 0.5})
    found = {("pcb-aoi@2", "pcb-aoi@1", "2"): {"agree": 3.0}, ("pcb-lite@2", "pcb-lite@1", "2"): {"agree": 1.0}}
    text = format_comparisons(found, {"pcb-aoi": RolloutState(revision=2), "pcb-lite": running})
    assert [ln.split()[0] for ln in text.splitlines() if "(current)" in ln] == ["pcb-lite@2"]
    assert "pcb-lite" not in format_comparisons(found, {"pcb-aoi": running})  # `--coe pcb-aoi`: its own only
