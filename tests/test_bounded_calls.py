"""`deployments.deadline.call_with_deadline`: a lost replica is retried within the deadline; every other failure is
explicit. The clock and the sleep are fakes: the retry schedule is checked without waiting."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from expertmesh.deployments.deadline import LOSS_BACKOFF_S, ExpertCallFailed, ReplicaLost, call_with_deadline
from expertmesh.errors import InvalidArgument, ResourceExhausted

FIXES = {"timeout_fix": "t", "full_fix": "f", "failure_fix": "x"}


class FakeTime:
    """A clock that only moves when the code under test sleeps; records every pause."""

    def __init__(self) -> None:
        self.now_s = 100.0
        self.pauses_s: list[float] = []

    def clock(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.pauses_s.append(seconds)
        self.now_s += seconds


def calls(*outcomes):
    """A send() whose n-th call raises or returns the n-th outcome; counts its calls."""
    seen = []

    def send():
        async def one():
            outcome = outcomes[len(seen) - 1]
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        seen.append(1)
        return one()
    return send, seen


def run(send, timeout_s, t: FakeTime, **kw):
    return asyncio.run(call_with_deadline(send, timeout_s, "expert 'chip'", clock=t.clock, sleep=t.sleep,
                                          **{**FIXES, **kw}))


def test_a_lost_replica_is_retried_with_growing_pauses_until_a_live_one_answers():
    t = FakeTime()
    send, seen = calls(ActorDiedError(), ActorDiedError(), "ok")
    assert run(send, 10.0, t) == "ok" and len(seen) == 3
    assert t.pauses_s == list(LOSS_BACKOFF_S[:2])


def test_retries_stop_at_their_limit():
    t = FakeTime()
    send, seen = calls(*[ActorDiedError()] * 9)
    with pytest.raises(ReplicaLost, match="lost its replica"):
        run(send, 10.0, t, retries_on_loss=1)
    assert len(seen) == 2 and t.pauses_s == [LOSS_BACKOFF_S[0]]


def test_retries_stop_before_a_pause_would_pass_the_deadline():
    t = FakeTime()
    send, seen = calls(*[ActorDiedError()] * 9)
    with pytest.raises(ReplicaLost):
        run(send, 0.6, t)  # 0.2 s, then 0.5 s more would end at 0.7 s > 0.6 s: no third try
    assert len(seen) == 2 and t.pauses_s == [0.2]


def test_the_last_pause_repeats_once_the_schedule_runs_out():
    t = FakeTime()
    send, seen = calls(*[ActorDiedError()] * 6, "ok")
    assert run(send, 60.0, t, retries_on_loss=6) == "ok"
    assert t.pauses_s == [0.2, 0.5, 1.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize("error, kind, text", [
    (BackPressureError(num_queued_requests=3, max_queued_requests=3), ResourceExhausted, "full queue"),
    (ValueError("boom"), ExpertCallFailed, "failed (ValueError)"),
    (InvalidArgument("bad image", field="image", fix="send a PNG"), InvalidArgument, "bad image"),
])
def test_other_failures_are_explicit_and_not_retried(error, kind, text):
    t = FakeTime()
    send, seen = calls(error, "never")
    with pytest.raises(kind, match=text.replace("(", r"\(").replace(")", r"\)")):
        run(send, 5.0, t)
    assert len(seen) == 1 and t.pauses_s == []


def test_an_error_inside_the_replica_passes_unwrapped_when_asked():
    t = FakeTime()
    send, _ = calls(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        run(send, 5.0, t, wrap_failures=False)


def test_a_slow_call_times_out_explicitly():
    def send():
        return asyncio.sleep(5)
    with pytest.raises(ExpertCallFailed, match="did not answer within 0.05 s"):
        asyncio.run(call_with_deadline(send, 0.05, "expert 'chip'", **FIXES))


def test_a_removed_deployment_counts_as_lost():
    t = FakeTime()
    send, seen = calls(DeploymentUnavailableError(DeploymentID(name="Router-node-1", app_name="expertmesh")), "never")
    with pytest.raises(ReplicaLost):  # the front router then runs the plan itself
        run(send, 5.0, t, retries_on_loss=0)
    assert len(seen) == 1


def remote(error: BaseException) -> BaseException:
    """`error` as a caller receives it from inside a replica: Ray's wrapper, with the remote stack in its text."""
    return RayTaskError("Router.inspect", "Traceback (most recent call last):\n  File \"router.py\"", error,
                        ).as_instanceof_cause()


def test_a_deliberate_error_from_inside_a_replica_arrives_as_raised_without_rays_stack():
    t = FakeTime()
    send, _ = calls(remote(ExpertCallFailed("expert 'qfp_defect' did not answer within 20 s", fix="retry later")))
    with pytest.raises(ExpertCallFailed) as info:
        run(send, 5.0, t, wrap_failures=False)
    assert type(info.value) is ExpertCallFailed and "Traceback" not in str(info.value)
    assert str(info.value) == "expert 'qfp_defect' did not answer within 20 s; fix: retry later"


def test_an_unexpected_error_from_inside_a_replica_is_wrapped_or_passed_as_asked():
    t = FakeTime()
    send, _ = calls(remote(ValueError("secret detail")))
    with pytest.raises(ExpertCallFailed, match=r"failed \(ValueError\)") as info:
        run(send, 5.0, t)
    assert "secret detail" not in str(info.value)
    send, _ = calls(remote(ValueError("secret detail")))
    with pytest.raises(RayTaskError):  # the ingress logs it and answers INTERNAL with the request id only
        run(send, 5.0, t, wrap_failures=False)
