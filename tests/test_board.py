"""Boards without Ray: the up-front check and how a stream ends (deployments.board, pure), and the ingress's board
loop (bounded in flight, a failed component never stops the others, a closed stream cancels what still runs)."""

from __future__ import annotations

import asyncio

import pytest

from expertmesh.deployments.board import (MAX_ID_CHARS, BoardComponent, BoardLimits, board_outcome, check_board,
                                          component_error)
from expertmesh.deployments.deadline import ExpertCallFailed
from expertmesh.deployments.deadline import Deadline
from expertmesh.deployments.ingress import IngressDeployment
from expertmesh.errors import (ErrorCode, ExpertMeshError, InvalidArgument, PayloadTooLarge, PermissionDenied,
                               ResourceExhausted)
from expertmesh.v1 import inspection_pb2 as pb

LIMITS = BoardLimits(max_components=4, max_in_flight=2)


def comp(factory_id="", image_num_bytes=10, **kw) -> BoardComponent:
    return BoardComponent(kw.get("request_id", ""), factory_id, kw.get("station_id", ""), kw.get("component_hint", ""),
                          image_num_bytes)


def refused(board_id="b", factory_id="factory-a", components=(comp(),), limits=LIMITS) -> ExpertMeshError:
    with pytest.raises(ExpertMeshError) as info:
        check_board(board_id, factory_id, "s", list(components), limits, max_image_bytes=100)
    return info.value


def test_a_whole_board_is_accepted():
    """A board within every limit passes the check (it returns, refusing nothing), whatever its size up to the limit."""
    for n in range(1, LIMITS.max_components + 1):
        assert check_board("b", "factory-a", "s", [comp("factory-a")] * n, LIMITS, max_image_bytes=100) is None
    assert check_board("b", "factory-a", "s", [comp(), comp(image_num_bytes=100)], LIMITS, max_image_bytes=100) is None


@pytest.mark.parametrize("kwargs, kind, field, fragment", [
    ({"factory_id": ""}, InvalidArgument, "factory_id", "no factory_id"),
    ({"board_id": "x" * (4 << 20)}, InvalidArgument, "board_id", "over 128"),
    ({"components": ()}, InvalidArgument, "components", "no components"),
    ({"components": [comp()] * 5}, InvalidArgument, "components", "5 components, over the limit of 4"),
    ({"components": [comp(), comp("factory-b")]}, PermissionDenied, "components[1].factory_id", "factory-b"),
    ({"components": [comp(), comp(image_num_bytes=0)]}, InvalidArgument, "components[1].image", "empty"),
    ({"components": [comp(image_num_bytes=101)]}, PayloadTooLarge, "components[0].image", "over the limit of 100"),
    ({"components": [comp(station_id="s" * (MAX_ID_CHARS + 1))]}, InvalidArgument, "components[0].station_id", "over"),
])
def test_a_board_that_cannot_run_whole_is_refused_naming_the_field(kwargs, kind, field, fragment):
    err = refused(**kwargs)
    assert type(err) is kind and err.field == field and fragment in err.message and err.fix


def test_the_stream_ends_ok_only_when_every_component_answered():
    assert board_outcome(3, {}) is None
    err = board_outcome(3, {2: component_error(2, ExpertCallFailed("expert 'x' did not answer", fix="retry")),
                            0: component_error(0, ResourceExhausted("the router has a full queue", fix="back off"))})
    assert err.code is ErrorCode.RESOURCE_EXHAUSTED  # the first failed component's status
    assert err.message.startswith("2 of 3 components failed")
    assert "components[0]: the router has a full queue" in err.message and "components[2]" in err.message
    assert "indexes 0, 2" in err.fix


def test_many_failures_are_counted_and_the_first_few_listed():
    err = board_outcome(40, {i: component_error(i, ExpertCallFailed("no", fix="f")) for i in range(30)})
    assert err.message.startswith("30 of 40") and "and 25 more" in err.message and err.fix.endswith(", ...)")


class FakeIngress:
    """The real ingress's board loop with `_routed` (a decoded component through the batcher) replaced: no Ray, no
    router."""

    def __init__(self, outcomes: dict[int, object], delay_s: float = 0.01, max_in_flight: int = 2) -> None:
        self.outcomes, self.delay_s = outcomes, delay_s
        self.board_limits = BoardLimits(max_components=100, max_in_flight=max_in_flight)
        self.running, self.most_running, self.started, self.cancelled = 0, 0, [], []
        self.recorded = []

    _run_board = IngressDeployment.func_or_class._run_board
    _board_component = IngressDeployment.func_or_class._board_component

    def _record(self, ingress, factory_id, t0, code, verdict=None, coe=""):
        self.recorded.append(code)

    def _internal(self, exc, request_id):
        return IngressDeployment.func_or_class._internal(exc, request_id)

    async def _routed(self, sized, meta, deadline):
        index = meta["index"]
        self.started.append(index)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay_s * (1 + index % 3))
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise
        finally:
            self.running -= 1
        outcome = self.outcomes.get(index, "ok")
        if isinstance(outcome, BaseException):
            raise outcome
        return {"category": "led", "category_confidence": 0.9, "verdict": "PASS", "defect": "", "latency_ms": 1.0,
                "trace": []}


def board(n: int) -> pb.InspectBoardRequest:
    return pb.InspectBoardRequest(board_id="b", factory_id="factory-a",
                                  components=[pb.InspectRequest(image=b"x") for _ in range(n)])


async def collect(ingress: FakeIngress, n: int, stop_after: int | None = None) -> list:
    out = []
    gen = ingress._run_board(board(n), [{"index": i} for i in range(n)], [{} for _ in range(n)], Deadline(60.0))
    async for item in gen:
        out.append(item)
        if stop_after is not None and len(out) >= stop_after:
            await gen.aclose()  # what happens when the client cancels: the stream is closed early
            break
    return out


def test_a_board_runs_at_most_max_in_flight_components_and_answers_each_once():
    ing = FakeIngress({}, max_in_flight=3)
    out = asyncio.run(collect(ing, 20))
    assert sorted(i for i, _ in out) == list(range(20)) and ing.most_running == 3
    assert all(isinstance(r, pb.InspectResponse) and r.component_index == i for i, r in out)


def test_a_failed_component_does_not_stop_the_others():
    ing = FakeIngress({1: InvalidArgument("image bytes could not be decoded", field="image", fix="send a PNG"),
                       3: ValueError("a bug")})
    out = dict(asyncio.run(collect(ing, 6)))
    assert sorted(out) == list(range(6))
    assert isinstance(out[1], InvalidArgument) and out[1].field == "components[1].image"
    assert out[3].code is ErrorCode.INTERNAL and "a bug" not in str(out[3])  # no detail leaked to the client
    assert ing.recorded.count("OK") == 4 and sorted(ing.recorded)[:2] == ["INTERNAL", "INVALID_ARGUMENT"]


def test_a_closed_stream_cancels_what_still_runs_and_starts_nothing_more():
    ing = FakeIngress({}, delay_s=0.05, max_in_flight=4)

    async def scenario():
        out = await collect(ing, 200, stop_after=1)
        await asyncio.sleep(0.3)  # anything left running would finish (and start more) here
        return out
    out = asyncio.run(scenario())
    assert len(out) == 1 and len(ing.started) <= 5 and ing.cancelled and ing.running == 0
