"""Batching concurrent requests into one downstream call, with the batch formed when a call slot frees.

Ray Serve's `@serve.batch` forms a batch first and then waits for a free slot (`max_concurrent_batches`): under
load the batches stay as small as they were when formed (one request each at a few tens per second) and queue up
behind the slots, so the downstream per-call cost is paid per request and the ingress saturates far below what
the hosts can do. This batcher takes a slot first and then the batch: while every slot is busy requests pile up,
and the next batch takes all of them (up to `max_size`) at once, with no added wait. Only a batch that starts
with nothing queued waits up to `wait_s` for company. A caller that goes (cancelled) before its batch is formed is
not sent; a batch whose callers have all gone has its call cancelled. Asyncio only (no Ray): unit-tested with a
fake sender.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class Batcher:
    def __init__(self, send: Callable[[list[Any]], Awaitable[list[Any]]], *, max_size: int, wait_s: float,
                 max_in_flight: int) -> None:
        if max_size < 1 or max_in_flight < 1 or wait_s < 0:
            raise ValueError(f"max_size ({max_size}) and max_in_flight ({max_in_flight}) must be at least 1 and "
                             f"wait_s ({wait_s}) at least 0")
        self.send, self.max_size, self.wait_s = send, max_size, wait_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.sizes: list[int] = []  # the sizes of the batches sent (most recent last; bounded)

    async def submit(self, item: Any) -> Any:
        """Queue `item`; returns its result from the batch it went in (or raises that batch's error)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._arrived.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.ensure_future(self._form_batches())
        return await future

    async def _form_batches(self) -> None:
        while True:
            await self._slots.acquire()
            waited = False
            while not self._live():
                self._arrived.clear()
                await self._arrived.wait()
                waited = True
            if waited and self.wait_s > 0:  # a batch that starts from nothing waits a little for company
                deadline = asyncio.get_running_loop().time() + self.wait_s
                while len(self._queue) < self.max_size:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            batch, self._queue = self._queue[:self.max_size], self._queue[self.max_size:]
            batch = [(item, f) for item, f in batch if not f.done()]  # a cancelled caller is not sent
            if not batch:
                self._slots.release()
                continue
            self.sizes = (self.sizes + [len(batch)])[-1000:]
            asyncio.ensure_future(self._run(batch))

    def _live(self) -> bool:
        self._queue = [(item, f) for item, f in self._queue if not f.done()]
        return bool(self._queue)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        """Send the batch; when every caller has gone before it answers (cancelled: clients that left, deadlines that
        passed), the downstream call is cancelled too, so no work goes on for nobody."""
        sending = asyncio.ensure_future(self.send([item for item, _ in batch]))

        def all_gone(_: asyncio.Future) -> None:
            if all(f.cancelled() for _, f in batch) and not sending.done():
                sending.cancel()

        for _, future in batch:
            future.add_done_callback(all_gone)
        try:
            results = await sending
            if len(results) != len(batch):
                raise RuntimeError(f"the batch of {len(batch)} got {len(results)} results")
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        except asyncio.CancelledError:  # every caller gone, or this task cancelled (the replica shuts down)
            for _, future in batch:
                future.cancel()
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._slots.release()
