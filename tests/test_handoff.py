"""runtime.wire.handoff: the executor's result straight back to the loop, the frame's slot given back only
when the compute has ended (issue 14); ComputeThreads, the worker's dedicated compute threads (a
queue.SimpleQueue, the result posted to the loop as the thread's last act): the same through them, their
bound, their shutdown with jobs running and queued, and plain ``run_in_executor`` jobs."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError, Executor, ThreadPoolExecutor

import pytest

from runtime.wire.handoff import ComputeThreads, submit

EXECUTORS = {"pool": lambda: ThreadPoolExecutor(1), "threads": lambda: ComputeThreads(1, "q")}


async def _until(cond, what: str) -> None:
    for _ in range(500):  # bounded: 5 s
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"waited 5 s for {what}")


@pytest.mark.parametrize("kind", EXECUTORS)
def test_result_and_error_reach_the_waiter(kind):
    ended: list[str] = []

    async def main():
        with EXECUTORS[kind]() as ex:
            assert await submit(ex, lambda: threading.current_thread().name, lambda: ended.append("a")) != \
                threading.current_thread().name  # ran on the executor, not on the loop
            with pytest.raises(ZeroDivisionError):
                await submit(ex, lambda: 1 // 0, lambda: ended.append("b"))

    asyncio.run(main())
    assert ended == ["a", "b"]


@pytest.mark.parametrize("kind", EXECUTORS)
def test_a_cancelled_waiter_keeps_the_slot_until_the_compute_ends(kind):
    """The queue bound counts running computes: cancelling the frame's task must not free its slot early."""
    gate = threading.Event()
    ended: list[float] = []

    async def main():
        loop = asyncio.get_running_loop()
        with EXECUTORS[kind]() as ex:
            fut = submit(ex, gate.wait, lambda: ended.append(loop.time()))
            waiter = asyncio.ensure_future(fut)
            await asyncio.sleep(0.05)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await asyncio.sleep(0.05)
            assert ended == []  # still computing: the slot is held
            gate.set()
            await _until(lambda: ended, "the compute's end")
            assert len(ended) == 1
            assert fut.cancelled()  # the result was dropped, not delivered to nobody

    asyncio.run(main())


@pytest.mark.parametrize("kind", EXECUTORS)
def test_a_shut_down_executor_raises_and_ends_nothing(kind):
    ended: list[int] = []

    async def main():
        ex = EXECUTORS[kind]()
        ex.shutdown()
        with pytest.raises(RuntimeError):
            submit(ex, lambda: 1, lambda: ended.append(1))

    asyncio.run(main())
    assert ended == []


def test_compute_threads_run_at_most_max_workers_jobs_at_once():
    gate = threading.Event()
    running: list[str] = []
    lock = threading.Lock()

    def job():
        with lock:
            running.append(threading.current_thread().name)
        gate.wait(10)

    async def main():
        ex = ComputeThreads(2, "tail")
        try:
            futs = [ex.post(job) for _ in range(3)]
            await _until(lambda: len(running) == 2, "two jobs running")
            await asyncio.sleep(0.05)
            assert len(running) == 2  # the third waits for a thread
            gate.set()
            await asyncio.wait_for(asyncio.gather(*futs), 10)
            assert len(running) == 3 and {n.rsplit("_", 1)[0] for n in running} == {"tail"}
            assert len({*running}) == 2  # two threads, reused
        finally:
            ex.shutdown()

    asyncio.run(main())


def test_shutdown_finishes_the_running_job_and_fails_the_queued_ones():
    """``shutdown(cancel_futures=True)`` (the worker's stop): the frame computing still gets its result; a frame
    queued behind it gets the pool's error and its slot back; a queued plain job's future is cancelled."""
    started, gate = threading.Event(), threading.Event()
    ended: list[str] = []

    def first():
        started.set()
        gate.wait(10)
        return "done"

    class Gone(Exception):
        pass

    async def main():
        ex = ComputeThreads(1, "tail", on_shutdown=lambda: Gone("shutting down"))
        running = ex.post(first, lambda: ended.append("first"))
        queued = ex.post(lambda: "never", lambda: ended.append("queued"))
        plain = ex.submit(lambda: "never")
        assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        ex.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(Gone, match="shutting down"):
            await asyncio.wait_for(queued, 10)
        assert ended == ["queued"]  # its slot given back although it never ran
        assert plain.cancelled()
        with pytest.raises(RuntimeError):
            ex.post(lambda: 1)
        gate.set()
        assert await asyncio.wait_for(running, 10) == "done"
        assert ended == ["queued", "first"]
        (thread,) = ex._threads
        thread.join(10)
        assert not thread.is_alive()  # it saw the end and stopped

    asyncio.run(main())


def test_compute_threads_take_plain_executor_jobs():
    """``run_in_executor`` (the worker's model loads, tile segments) and ``Executor.map`` use the same threads."""

    async def main():
        ex: Executor = ComputeThreads(2, "tail")
        try:
            loop = asyncio.get_running_loop()
            name = await loop.run_in_executor(ex, lambda: threading.current_thread().name)
            assert name.startswith("tail_")
            with pytest.raises(ZeroDivisionError):
                await loop.run_in_executor(ex, lambda: 1 // 0)
            assert list(ex.map(lambda v: v * 2, range(4))) == [0, 2, 4, 6]
            fut = ex.submit(time.sleep, 0.01)
            assert fut.result(10) is None and not fut.cancel()
        finally:
            ex.shutdown(wait=True)
        with pytest.raises(RuntimeError):
            ex.submit(lambda: 1)
        with pytest.raises(ValueError):
            ComputeThreads(0)

    asyncio.run(main())


def test_a_cancelled_plain_job_does_not_run():
    gate, ran = threading.Event(), []

    async def main():
        ex = ComputeThreads(1)
        try:
            busy = ex.submit(gate.wait, 10)
            later = ex.submit(ran.append, 1)
            assert later.cancel()
            gate.set()
            assert busy.result(10)
            with pytest.raises(CancelledError):
                later.result(1)
            assert await asyncio.wrap_future(ex.submit(lambda: 5)) == 5  # after the cancelled one: nothing ran it
            assert ran == []
        finally:
            ex.shutdown()

    asyncio.run(main())


def test_then_gets_the_result_or_error_in_the_callback_and_nothing_is_left_unretrieved():
    """``post(fn, then=...)``: ``then`` runs on the loop with (result, None) or (None, error); an error it took is
    not reported as never retrieved when the future is dropped unawaited (the worker's stream path)."""
    import gc

    seen: list[tuple[object, object]] = []
    reported: list[dict] = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        ex = ComputeThreads(1)
        try:
            done = asyncio.Event()

            def then(value, error):
                seen.append((value, type(error)))
                if len(seen) == 2:
                    done.set()

            ex.post(lambda: 7, then=then)
            ex.post(lambda: 1 // 0, then=then)
            await asyncio.wait_for(done.wait(), 10)
            await asyncio.sleep(0.01)
            gc.collect()
            await asyncio.sleep(0.01)
        finally:
            ex.shutdown()

    asyncio.run(main())
    assert seen == [(7, type(None)), (None, ZeroDivisionError)]
    assert reported == []
