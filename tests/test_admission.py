"""Admission, quotas and deadlines at the ingress (pure parts; no Ray): `deployments.admission`, `deployments.quotas`,
`deployments.deadline`, `deployments.limits`, and the batcher's cancellation."""

from __future__ import annotations

import asyncio

import pytest

from expertmesh.deployments.admission import Admission
from expertmesh.deployments.auth import TokenTable
from expertmesh.deployments.batcher import Batcher
from expertmesh.deployments.deadline import Deadline, call_with_deadline, exceeded, request_budget_s
from expertmesh.deployments.limits import IngressLimits, check_metadata
from expertmesh.deployments.quotas import FactoryQuota
from expertmesh.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted

FREE = FactoryQuota()


def test_admission_refuses_past_the_bound_and_never_counts_a_refusal():
    a = Admission(max_in_flight_components=10)
    assert a.arrive("a", 6, FREE, 0.0, "board") is None
    assert a.arrive("a", 4, FREE, 0.0) is None
    with pytest.raises(ResourceExhausted, match="at capacity .* fair share"):
        a.arrive("a", 5, FREE, 0.0, "board")  # alone, factory a's fair share is the whole ingress, and it holds it
    assert a.in_flight == 10 and not a.waiting
    assert a.release("a", 10) == []
    assert a.arrive("a", 50, FREE, 0.0, "board") is None  # larger than the whole bound: admitted alone
    with pytest.raises(ValueError, match="at least 1"):
        Admission(0)


def test_a_factory_over_its_quota_is_refused_naming_the_factory_and_the_limit():
    a = Admission(100)
    capped = FactoryQuota(max_in_flight=3)
    for _ in range(3):
        a.arrive("b", 1, capped, 0.0)
    with pytest.raises(ResourceExhausted, match="factory 'b' has 3 components in flight .* max_in_flight quota is 3") as e:
        a.arrive("b", 1, capped, 0.0)
    assert e.value.field == "factory_id"
    assert a.arrive("a", 1, capped, 0.0) is None  # another factory is not affected


def test_a_board_over_a_factory_cap_goes_when_the_factory_has_nothing_in_flight():
    a = Admission(100)
    assert a.arrive("b", 10, FactoryQuota(max_in_flight=3), 0.0, "board") is None
    with pytest.raises(ResourceExhausted, match="max_in_flight quota"):
        a.arrive("b", 1, FactoryQuota(max_in_flight=3), 0.0)


def test_the_rate_quota_is_a_token_bucket_on_the_injected_clock():
    a = Admission(100)
    q = FactoryQuota(rate_per_s=2, burst=2)
    a.arrive("b", 1, q, 0.0)
    a.arrive("b", 1, q, 0.0)
    with pytest.raises(ResourceExhausted, match=r"factory 'b' is over its rate quota of 2 components/s \(burst 2\)") as e:
        a.arrive("b", 1, q, 0.1)
    assert "retry after 0.40 s" in e.value.fix  # 0.2 of the 1 token refilled by 0.1 s
    assert a.in_flight == 2  # a refusal counts nothing
    a.arrive("b", 1, q, 0.6)  # 1.2 tokens refilled by then
    with pytest.raises(ResourceExhausted):
        a.arrive("b", 1, q, 0.6)
    with pytest.raises(ValueError, match="burst is 5.0 but rate_per_s is not set"):
        FactoryQuota(burst=5)


def test_a_contended_ingress_queues_within_the_fair_share_and_frees_slots_to_the_least_served_factory():
    a = Admission(4)
    for _ in range(4):
        assert a.arrive("flood", 1, FREE, 0.0) is None
    # full: "quiet" (nothing in flight) is within its share (4 x 1/2) and queues; "flood" holds 4 > its share: refused
    t_quiet = a.arrive("quiet", 1, FREE, 0.0)
    assert t_quiet is not None and not t_quiet.admitted
    with pytest.raises(ResourceExhausted, match="fair share"):
        a.arrive("flood", 1, FREE, 0.0)
    assert a.release("flood", 1) == [t_quiet] and a.by_factory["quiet"] == 1
    heavy, w3 = Admission(4), FactoryQuota(weight=3)
    for _ in range(4):
        assert heavy.arrive("flood", 1, w3, 0.0) is None
    t_a = heavy.arrive("quiet", 1, FREE, 0.0)
    assert heavy.fair_share("flood") == 3.0 and heavy.fair_share("quiet") == 1.0  # 4 x 3/(3+1), 4 x 1/(3+1)
    with pytest.raises(ResourceExhausted, match=r"fair share \(4 of 3\)"):
        heavy.arrive("flood", 1, w3, 0.0)
    assert heavy.release("flood", 1) == [t_a] and t_a.admitted  # the freed slot goes to the waiting quiet factory


def test_freed_slots_go_to_the_waiter_with_the_least_in_flight_per_weight_and_an_abandoned_one_leaves():
    a = Admission(6)
    a.arrive("x", 1, FREE, 0.0)
    for _ in range(5):
        a.arrive("y", 1, FREE, 0.0)
    tx1 = a.arrive("x", 1, FREE, 0.0)  # share 6 x 1/2 = 3, holds 1: queues
    tz1 = a.arrive("z", 1, FREE, 0.0)  # share 6 x 1/3 = 2: queues
    tz2 = a.arrive("z", 1, FREE, 0.0)
    assert None not in (tx1, tz1, tz2)
    with pytest.raises(ResourceExhausted, match="fair share"):
        a.arrive("x", 1, FREE, 0.0)  # holds 1 + 1 queued, share 2
    assert a.release("y", 1) == [tz1]  # z: 0 in flight per weight, x: 1
    assert a.release("y", 1) == [tx1]  # a tie (1 and 1): the older ticket
    assert a.abandon(tz2) == [] and not a.waiting  # its client went before a slot came
    assert a.release("y", 1) == [] and a.in_flight == 5


def test_abandoning_a_ticket_that_was_just_admitted_releases_its_slot():
    a = Admission(1)
    a.arrive("x", 1, FREE, 0.0)
    t = a.arrive("y", 1, FREE, 0.0)
    assert a.release("x", 1) == [t] and t.admitted and a.in_flight == 1
    assert a.abandon(t) == [] and a.in_flight == 0 and not a.waiting


def test_the_tokens_file_takes_quotas_beside_the_tokens_and_names_a_bad_one(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text("tokens:\n  token-aaaaaaaaaaaaaaaa: factory-a\n  token-bbbbbbbbbbbbbbbb: factory-b\n"
                    "quotas:\n  default: {rate_per_s: 50}\n  factory-b: {rate_per_s: 5, max_in_flight: 8, weight: 2}\n")
    table = TokenTable.load(path)
    assert table.factories == {"factory-a", "factory-b"}
    assert table.quotas.of("factory-b") == FactoryQuota(rate_per_s=5, max_in_flight=8, weight=2)
    assert table.quotas.of("factory-a").rate_per_s == 50
    path.write_text("tokens:\n  token-aaaaaaaaaaaaaaaa: factory-a\nquotas:\n  factory-a: {max_in_flight: 0}\n")
    with pytest.raises(InvalidArgument, match="bad quota") as e:
        TokenTable.load(path)
    assert e.value.field == "quotas.factory-a.max_in_flight"
    path.write_text("tokens:\n  token-aaaaaaaaaaaaaaaa: factory-a\nlimits: {}\n")
    with pytest.raises(InvalidArgument, match="unknown sections"):
        TokenTable.load(path)
    path.write_text("token-aaaaaaaaaaaaaaaa: factory-a\n")  # the flat form: no quotas
    assert TokenTable.load(path).quotas.of("factory-a") == FREE


def test_the_request_budget_is_the_clients_capped_by_the_server_less_a_margin():
    assert request_budget_s(None, 60.0) == pytest.approx(59.9)
    assert request_budget_s("2", 60.0) == pytest.approx(1.9)
    assert request_budget_s("0.5", 60.0) == pytest.approx(0.45)
    assert request_budget_s("600", 60.0) == pytest.approx(59.9)  # the client cannot lift the server's bound
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(InvalidArgument) as e:
            request_budget_s(bad, 60.0)
        assert e.value.field == "x-expertmesh-timeout-seconds"


def test_a_deadline_counts_down_on_the_injected_clock_and_hands_the_next_hop_less():
    now = [100.0]
    d = Deadline(2.0, clock=lambda: now[0])
    assert d.remaining_s() == 2.0 and d.for_next_hop() == pytest.approx(1.9)
    now[0] = 101.5
    assert d.for_next_hop() == pytest.approx(0.45)
    d.check("somewhere")
    now[0] = 102.0
    with pytest.raises(DeadlineExceeded, match="passed in the router"):
        d.check("in the router")
    assert exceeded("x").http_status == 504 and exceeded("x").grpc_status_name == "DEADLINE_EXCEEDED"


def test_a_call_past_the_requests_deadline_is_deadline_exceeded_not_unavailable():
    async def slow():
        await asyncio.sleep(1.0)

    async def go():
        with pytest.raises(DeadlineExceeded):
            await call_with_deadline(slow, 0.01, "the router", timeout_fix="", full_fix="", failure_fix="",
                                     on_timeout=lambda: exceeded("waiting for the router"))

    asyncio.run(go())


def test_metadata_is_bounded_before_it_is_copied():
    limits = IngressLimits(metadata_max_entries=2, metadata_max_value_chars=8)
    assert check_metadata({"product": "p1"}, limits) == {"product": "p1"}
    cases = [({"a": "1", "b": "2", "c": "3"}, "metadata", "3 entries"),
             ({"product": "x" * 9}, "metadata.product", "9 characters"),
             ({"bad\nkey": "1"}, "metadata", "printable ASCII"),
             ({"n": 3}, "metadata.n", "not a string"),
             (["a"], "metadata", "not a map")]
    for value, field, message in cases:
        with pytest.raises(InvalidArgument, match=message) as e:
            check_metadata(value, limits, prefix="components[2].")
        assert e.value.field == "components[2]." + field


def test_a_batch_whose_callers_all_went_has_its_downstream_call_cancelled():
    started, cancelled = asyncio.Event(), []

    async def send(items):
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(len(items))
            raise
        return items

    async def go():
        b = Batcher(send, max_size=8, wait_s=0.0, max_in_flight=1)
        callers = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        await started.wait()
        callers[0].cancel()
        callers[1].cancel()
        await asyncio.sleep(0.01)
        assert cancelled == []  # one caller still waits: the call goes on
        callers[2].cancel()
        await asyncio.sleep(0.01)
        assert cancelled == [3]

    asyncio.run(go())


def test_a_refusal_for_the_fair_share_takes_nothing_from_the_factorys_rate():
    a, q = Admission(2), FactoryQuota(rate_per_s=1, burst=3)
    a.arrive("x", 1, q, 0.0)
    a.arrive("x", 1, q, 0.0)
    with pytest.raises(ResourceExhausted, match="fair share"):
        a.arrive("x", 1, q, 0.0)  # full, and x holds all of it
    a.release("x", 2)
    assert a.arrive("x", 1, q, 0.0) is None  # the third token was still there
