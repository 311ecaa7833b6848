"""Live changes, the pure parts: the rollout state machine, the canary's share, agreement, serving keys. No Ray."""

from __future__ import annotations

import pytest

from expertmesh.cluster.rollout import RolloutRefused, RolloutState, promote, rollback, start_canary, update
from expertmesh.deployments.config import ServeSettings, deployment_options
from expertmesh.deployments.served import with_rollout
from expertmesh.experts.revisions import keyed, plain_name, serving_keys
from expertmesh.router.canary import CanarySplitter, agreement
from expertmesh.router.plan import ExpertOutput, aggregate, route, triggered_calls
from expertmesh.rollout_command import target_coe
from expertmesh.errors import InvalidArgument


def test_update_learns_first_then_switches():
    steps = update(RolloutState(), "/specs/v2.yaml")
    assert [s.known for s in steps] == [("/specs/v2.yaml",), ("/specs/v2.yaml",)]
    assert steps[0].stable == "" and steps[0].revision == 0  # step 1: the hosts learn v2, the router still sends v1
    final = steps[1]
    assert (final.stable, final.previous, final.revision) == ("/specs/v2.yaml", "", 1)
    assert final.router_config() == {"revision": 1, "stable": "/specs/v2.yaml", "canary": None}


def test_rollback_is_one_step_and_keeps_the_old_revision_known():
    v2 = update(RolloutState(), "/v2.yaml")[-1]
    steps = rollback(v2)
    assert len(steps) == 1  # the hosts still hold the built spec (always) and v2
    back = steps[0]
    assert (back.stable, back.previous, back.revision) == ("", "/v2.yaml", 2)
    assert "/v2.yaml" in back.known  # requests in flight on v2 finish; the next change drops it
    again = rollback(back)[-1]  # a rollback of a rollback returns to v2
    assert again.stable == "/v2.yaml"


def test_a_change_drops_revisions_nobody_uses():
    s = update(RolloutState(), "/v2.yaml")[-1]
    s = update(s, "/v3.yaml")[-1]
    assert set(s.known) == {"/v3.yaml", "/v2.yaml"}
    s = update(s, "/v4.yaml")[-1]
    assert set(s.known) == {"/v4.yaml", "/v3.yaml"}  # v2: neither in use nor the rollback target


def test_canary_promote_and_end():
    steps = start_canary(RolloutState(), "/v2.yaml", "factory-a", 0.25)
    assert len(steps) == 2 and steps[0].canary is None and steps[-1].canary.share == 0.25
    c = steps[-1]
    assert c.in_use() == ("", "/v2.yaml")
    promoted = promote(c)[-1]
    assert (promoted.stable, promoted.canary, promoted.previous) == ("/v2.yaml", None, "")
    ended = rollback(c)[-1]
    assert ended.canary is None and ended.stable == "" and "/v2.yaml" in ended.known


@pytest.mark.parametrize("bad", [
    lambda: update(RolloutState(), ""),  # already stable
    lambda: promote(RolloutState()),  # no canary
    lambda: rollback(RolloutState()),  # nothing to return to
    lambda: start_canary(RolloutState(), "", "factory-a", 0.1),  # the stable revision itself
])
def test_changes_that_cannot_apply_say_why(bad):
    with pytest.raises(RolloutRefused, match="; |nothing|no canary"):
        bad()


def test_canary_share_is_exact_and_only_for_its_factory():
    split = CanarySplitter()
    canary = {"spec": "/v2.yaml", "factory": "factory-a", "share": 0.3}
    picks = [split.assign("factory-a", "", canary) for _ in range(100)]
    assert sum(p.revision == "/v2.yaml" for p in picks) == 30
    assert all(p.shadow == "" for p in picks if p.revision == "/v2.yaml")  # each canary answer has a stable shadow
    assert all(split.assign("factory-b", "", canary).revision == "" for _ in range(20))
    assert split.assign("factory-a", "", None).revision == ""


def test_agreement():
    a = {"verdict": "DEFECT", "defect": "missing"}
    assert agreement(a, dict(a)) == "agree"
    assert agreement(a, {"verdict": "DEFECT", "defect": "misaligned"}) == "disagree"
    assert agreement(a, RuntimeError("x")) == "failed"


def test_keyed_spec_routes_and_aggregates_by_key(default_spec):
    versions = {e.name: "v1" for e in default_spec.experts}
    keys = serving_keys(versions, {**versions, "chip_defect": "v2"})
    assert keys["chip_defect"] == "chip_defect@v2" and keys["qfp_defect"] == "qfp_defect"
    spec = keyed(default_spec, keys)
    r = route(spec, "chip_resistor", 0.99)
    assert [c.expert for c in r.calls] == ["chip_defect@v2"]
    triggered = triggered_calls(spec, ExpertOutput("chip_defect@v2", "solder_suspect", 0.9), {"chip_defect@v2"})
    assert [c.expert for c in triggered] == ["solder_fine"]  # its dependency edges follow it
    outcome = aggregate(spec, [ExpertOutput("chip_defect@v2", "missing", 0.9)])
    assert outcome.decided_by == "chip_defect@v2" and plain_name(outcome.decided_by) == "chip_defect"
    assert keyed(default_spec, serving_keys(versions, versions)) is default_spec  # nothing changed: the same spec


def test_with_rollout_reaches_every_host_the_router_and_the_ingress(default_spec):
    opts = deployment_options(default_spec, ServeSettings())
    state = update(RolloutState(), "/v2.yaml")[-1]
    out = with_rollout(opts, state, [64, 96, 128], {"power-boards": "/power.yaml"})
    assert out["Host"]["user_config"]["revisions"] == [*state.known, "/power.yaml"]  # other CoEs are revisions too
    assert out["Host"]["user_config"]["experts"] == opts["Host"]["user_config"]["experts"]  # the rest is kept
    assert out["Router"]["user_config"]["rollout"] == state.router_config()
    assert out["Router"]["user_config"]["coes"] == {"power-boards": "/power.yaml"}
    assert out["Ingress"]["user_config"] == {"input_sizes_px": [64, 96, 128], "coes": ["power-boards"]}


def test_another_coes_live_change_reaches_the_hosts_and_the_router(default_spec):
    """`rollout --coe power-boards`: its own state; "" stable is its deployed file, its new revision a file of its own."""
    opts = deployment_options(default_spec, ServeSettings())
    power = start_canary(RolloutState(), "/power-v2.yaml", "factory-b", 0.5)[-1]
    out = with_rollout(opts, RolloutState(), [64, 96], {"power-boards": "/power.yaml"},
                       {"power-boards": power, "not-served": update(RolloutState(), "/x.yaml")[-1]})
    assert out["Host"]["user_config"]["revisions"] == ["/power.yaml", "/power-v2.yaml"]  # not "" twice, not /x.yaml
    assert out["Router"]["user_config"]["coe_rollouts"] == {"power-boards": power.router_config()}
    assert out["Router"]["user_config"]["rollout"] == RolloutState().router_config()  # the app's own CoE as built


def test_each_coes_canary_counts_its_factorys_requests_on_its_own():
    split = CanarySplitter()
    canary = {"spec": "/v2.yaml", "factory": "factory-a", "share": 0.5}
    a = [split.assign("factory-a", "", canary, coe="pcb-aoi").revision for _ in range(4)]
    b = [split.assign("factory-a", "/lite.yaml", {**canary, "spec": "/lite-v2.yaml"}, coe="pcb-lite").revision
         for _ in range(4)]
    assert a.count("/v2.yaml") == 2 and b.count("/lite-v2.yaml") == 2 and b[0] == "/lite.yaml"


def test_rollout_names_the_coe_it_changes():
    served = {"pcb-aoi": None, "pcb-lite": "/lite.yaml"}
    assert target_coe("", served) == "" and target_coe("pcb-aoi", served) == "" and target_coe("pcb-lite", served) == "pcb-lite"
    with pytest.raises(InvalidArgument, match="no CoE named 'nope'") as err:
        target_coe("nope", served)
    assert err.value.field == "--coe" and "pcb-lite" in err.value.fix
