"""Gather concurrent requests into batches and run each batch on the one model thread.

A bounded ``asyncio.Queue`` holds waiting jobs (full: :class:`QueueFull`, which the app answers with 429).
The loop takes the first waiting job, then up to ``max_batch - 1`` more that arrive within ``max_wait``
(or are already waiting), drops the jobs whose client gave up (timed out or disconnected: their future is
done), and runs the rest as one call of ``run(jobs) -> outcomes`` on a single worker thread, so the event
loop keeps accepting and checking requests while the model generates. While a batch runs, new arrivals
queue up and form the next batch: under load, batches fill by themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from esn.serve.metrics import Metrics


class QueueFull(Exception):
    """The queue of waiting requests is at its limit."""


@dataclass
class _Waiting:
    job: Any
    future: asyncio.Future
    since: float  # time.monotonic() at submission


_STOP = object()


class Batcher:
    """Turns concurrent conversion requests into batched ``run`` calls on one model thread.

    A batch closes at ``max_batch`` rows or ``max_wait_s`` after its first request; the queue holds at
    most ``queue_size`` requests (the service answers 429 beyond).
    """
    def __init__(self, run: Callable[[list[Any]], list[Any]], *, max_batch: int, max_wait_s: float,
                 queue_size: int, metrics: Metrics):
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=queue_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esn-model")
        self.task: asyncio.Task | None = None
        self.batches = self.rows = 0  # run so far

    @property
    def depth(self) -> int:
        """Requests waiting for a batch now."""
        return self.queue.qsize()

    def start(self) -> None:
        """Start the batching loop on the running event loop (call once, from the service's start-up)."""
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="esn-batcher")

    async def stop(self) -> None:
        """Finish what is queued and the batch in flight, then stop the loop and the model thread."""
        if self.task is not None:
            await self.queue.put(_STOP)
            await self.task
        self.executor.shutdown(wait=True)

    def submit(self, job: Any) -> asyncio.Future:
        """Queue ``job``; the future gets its outcome. ``QueueFull`` when the queue is at its limit."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Waiting(job, future, time.monotonic()))
        except asyncio.QueueFull:
            raise QueueFull from None
        self.metrics.queue_depth.set(self.depth)
        return future

    async def _gather(self, first: _Waiting) -> tuple[list[_Waiting], bool]:
        """``first`` and the jobs that join it within ``max_wait``; True if the stop marker was taken."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self.queue.get()
            if first is _STOP:
                break
            batch, stopping = await self._gather(first)
            self.metrics.queue_depth.set(self.depth)
            live = [w for w in batch if not w.future.done()]  # a done future: its client gave up
            if not live:
                continue
            started = time.monotonic()
            self.metrics.rows_in_flight.set(len(live))
            try:
                outcomes = await loop.run_in_executor(self.executor, self.run, [w.job for w in live])
            except Exception as exc:  # a bug in run(): every row of the batch gets it
                outcomes = [exc] * len(live)
            finally:
                self.metrics.rows_in_flight.set(0)
            self.batches, self.rows = self.batches + 1, self.rows + len(live)
            self.metrics.batch_size.observe(len(live))
            self.metrics.batch_seconds.observe(time.monotonic() - started)
            for waiting, outcome in zip(live, outcomes, strict=True):
                if waiting.future.done():  # the client left while its row was generated
                    continue
                if isinstance(outcome, Exception):
                    waiting.future.set_exception(outcome)
                else:
                    outcome.extra["queue_s"] = started - waiting.since
                    waiting.future.set_result(outcome)
        # Anything still queued behind the stop marker (there should be nothing) is answered, not lost.
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not _STOP and not item.future.done():
                item.future.set_exception(RuntimeError("the service stopped before this request ran"))
