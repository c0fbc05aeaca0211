"""The service's batcher on its own: gathering within the wait, the batch cap, the bounded queue, jobs whose
client gave up, a failing batch, and a stop that finishes what is queued. ``run`` here just records the
batches it is given (the model path is tested end to end in tests/test_serve.py)."""

import asyncio
import threading

import pytest

pytest.importorskip("prometheus_client")

from esn.serve.batcher import Batcher, QueueFull
from esn.serve.convert import Outcome
from esn.serve.metrics import Metrics


class Recorder:
    """A ``run`` that records each batch, answers ``Outcome(extra={"job": job})`` per row, and can be held."""

    def __init__(self):
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.gate.set()
        self.thread_names: set[str] = set()

    def __call__(self, jobs):
        self.gate.wait(10)
        self.thread_names.add(threading.current_thread().name)
        self.batches.append(list(jobs))
        if "boom" in jobs:
            raise RuntimeError("boom")
        return [Outcome(batch_size=len(jobs), extra={"job": j}) for j in jobs]


def _batcher(run, **kw) -> Batcher:
    kw = {"max_batch": 4, "max_wait_s": 0.05, "queue_size": 16, **kw}
    return Batcher(run, metrics=Metrics(kw["max_batch"]), **kw)


def test_gathers_within_the_wait_and_caps_the_batch():
    async def main():
        run = Recorder()
        b = _batcher(run)
        b.start()
        futures = [b.submit(i) for i in range(6)]
        outcomes = await asyncio.gather(*futures)
        await b.stop()
        return run, outcomes

    run, outcomes = asyncio.run(main())
    assert run.batches == [[0, 1, 2, 3], [4, 5]]
    assert [o.extra["job"] for o in outcomes] == list(range(6))
    assert all(o.extra["queue_s"] >= 0 for o in outcomes)
    assert run.thread_names == {"esn-model_0"}  # one model thread, off the event loop


def test_arrivals_during_a_batch_form_the_next_one():
    async def main():
        run = Recorder()
        run.gate.clear()  # the first batch blocks until released
        b = _batcher(run, max_wait_s=0.0)
        b.start()
        first = b.submit("a")
        await asyncio.sleep(0.05)
        later = [b.submit(x) for x in "bcd"]
        assert b.depth == 3
        run.gate.set()
        await asyncio.gather(first, *later)
        await b.stop()
        return run.batches

    assert asyncio.run(main()) == [["a"], ["b", "c", "d"]]


def test_full_queue_and_abandoned_jobs():
    async def main():
        run = Recorder()
        run.gate.clear()
        b = _batcher(run, max_batch=2, max_wait_s=0.0, queue_size=2)
        b.start()
        running = b.submit("running")
        await asyncio.sleep(0.05)  # taken off the queue: the queue is empty again
        waiting = [b.submit("left"), b.submit("stays")]
        with pytest.raises(QueueFull):
            b.submit("one too many")
        waiting[0].cancel()  # its client timed out or hung up before its batch ran
        run.gate.set()
        await running
        stays = await waiting[1]
        await b.stop()
        return run.batches, stays

    batches, stays = asyncio.run(main())
    assert batches == [["running"], ["stays"]] and stays.extra["job"] == "stays"


def test_a_failing_batch_fails_its_rows_only_and_stop_finishes_the_queue():
    async def main():
        run = Recorder()
        b = _batcher(run, max_batch=2, max_wait_s=0.01)
        b.start()
        bad = [b.submit("boom"), b.submit("x")]
        results = await asyncio.gather(*bad, return_exceptions=True)
        queued = [b.submit(i) for i in range(3)]
        await b.stop()  # the three queued jobs are answered before the loop ends
        return results, [f.result().extra["job"] for f in queued], run.batches

    results, answered, batches = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert answered == [0, 1, 2] and batches[1:] == [[0, 1], [2]]
