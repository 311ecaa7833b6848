"""`deployments.router.bounded`: a lost replica is retried within the deadline; every other failure is explicit."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from expertmesh.deployments.router import ExpertCallFailed, ReplicaLost, bounded
from expertmesh.errors import ResourceExhausted

FIXES = {"timeout_fix": "t", "full_fix": "f", "failure_fix": "x"}


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


def test_a_lost_replica_is_retried_until_a_live_one_answers():
    send, seen = calls(ActorDiedError(), ActorDiedError(), "ok")
    assert asyncio.run(bounded(send, 10.0, "expert 'chip'", **FIXES)) == "ok" and len(seen) == 3


def test_retries_stop_at_their_limit_and_at_the_deadline():
    send, seen = calls(*[ActorDiedError()] * 9)
    with pytest.raises(ReplicaLost, match="lost its replica"):
        asyncio.run(bounded(send, 10.0, "expert 'chip'", retries_on_loss=1, **FIXES))
    assert len(seen) == 2
    send, seen = calls(*[ActorDiedError()] * 9)
    with pytest.raises(ReplicaLost):
        asyncio.run(bounded(send, 0.3, "expert 'chip'", **FIXES))  # 0.2 s, then the next pause would pass 0.3 s
    assert len(seen) == 2


@pytest.mark.parametrize("error, kind, text", [
    (BackPressureError(num_queued_requests=3, max_queued_requests=3), ResourceExhausted, "full queue"),
    (ValueError("boom"), ExpertCallFailed, "failed (ValueError)"),
])
def test_other_failures_are_explicit_and_not_retried(error, kind, text):
    send, seen = calls(error, "never")
    with pytest.raises(kind, match=text.replace("(", r"\(").replace(")", r"\)")):
        asyncio.run(bounded(send, 5.0, "expert 'chip'", **FIXES))
    assert len(seen) == 1


def test_a_slow_call_times_out_explicitly():
    def send():
        return asyncio.sleep(5)
    with pytest.raises(ExpertCallFailed, match="did not answer within 0.1 s"):
        asyncio.run(bounded(send, 0.1, "expert 'chip'", **FIXES))


def test_a_removed_deployment_counts_as_lost():
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    send, seen = calls(DeploymentUnavailableError(DeploymentID(name="Router-node-1", app_name="expertmesh")), "never")
    with pytest.raises(ReplicaLost):  # the front router then runs the plan itself
        asyncio.run(bounded(send, 5.0, "the plan executor on node-1", retries_on_loss=0, **FIXES))
