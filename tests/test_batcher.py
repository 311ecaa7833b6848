"""The ingress's batcher (deployments/batcher.py, asyncio only): batches form when a slot frees."""

from __future__ import annotations

import asyncio

import pytest

from expertmesh.deployments.batcher import Batcher


class SlowSender:
    def __init__(self, delay_s: float = 0.05, fail: bool = False) -> None:
        self.delay_s, self.fail, self.batches = delay_s, fail, []

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("downstream failed")
        return [i * 10 for i in items]


def test_requests_queued_while_every_slot_is_busy_go_in_one_batch():
    async def main():
        send = SlowSender(delay_s=0.05)
        b = Batcher(send, max_size=64, wait_s=0.001, max_in_flight=1)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.01)  # the first batch (of one) is in flight: the rest pile up behind its slot
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 21)]
        assert await first == 0 and await asyncio.gather(*rest) == [i * 10 for i in range(1, 21)]
        return send.batches
    batches = asyncio.run(main())
    assert [len(x) for x in batches] == [1, 20]  # not twenty batches of one


def test_a_batch_is_capped_and_a_lone_request_waits_only_wait_s():
    async def main():
        send = SlowSender(delay_s=0.01)
        b = Batcher(send, max_size=4, wait_s=0.02, max_in_flight=1)
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        t0 = asyncio.get_running_loop().time()
        assert await b.submit(7) == 70
        return send.batches, results, asyncio.get_running_loop().time() - t0
    batches, results, lone_s = asyncio.run(main())
    assert results == [i * 10 for i in range(10)] and max(len(x) for x in batches) == 4
    assert lone_s < 0.5


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_still_runs():
    async def main():
        send = SlowSender(delay_s=0.0, fail=True)
        b = Batcher(send, max_size=8, wait_s=0.0, max_in_flight=2)
        outcomes = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        send.fail = False
        return outcomes, await b.submit(5)
    outcomes, later = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) for o in outcomes) and later == 50


def test_a_cancelled_caller_is_not_sent():
    async def main():
        send = SlowSender(delay_s=0.05)
        b = Batcher(send, max_size=8, wait_s=0.0, max_in_flight=1)
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(b.submit(2))
        kept = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0)
        gone.cancel()
        await first
        return await kept, send.batches
    kept, batches = asyncio.run(main())
    assert kept == 30 and [2] not in batches and all(2 not in x for x in batches)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(SlowSender(), max_size=0, wait_s=0.0, max_in_flight=1)
