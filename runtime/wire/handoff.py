"""A frame's compute handed to a thread and its result handed back to the event loop in one step
(issue 14's runtime overhead): the worker's decode + tail (runtime.worker.service, on :class:`ComputeThreads`);
the agent's board executor (runtime.agent.client, through :func:`submit`: a dedicated board thread was measured
and not kept, overhead.md 2026-12-05 q3).

``loop.run_in_executor`` + ``asyncio.shield`` (what ``InferenceService.process`` used) returns through a
``concurrent.futures.Future``, its condition lock, a ``call_soon_threadsafe`` to copy the state into an
asyncio future, then one more loop pass for the shield's outer future before the awaiting task runs. Here
the thread schedules the result straight onto the loop: one ``call_soon_threadsafe``, one future.
Measured on uvloop, job end to the awaiting coroutine running, 5 ms idle before each job, six alternating rounds
under the bench lock (overhead.md, 04:03): p50 17 us run_in_executor + shield, 11 us here. In
``edgesplit bench`` the gain is below what three runs resolve (803 KB 2.21 -> 2.18 ms, means of three): after a
thread that computed (torch, 10 ms), waking the loop costs 67 us this way and 83 us the other (04:21), most of it
the wake-up itself.

:class:`ComputeThreads` goes one step further (overhead.md, 2026-12-05): dedicated threads fed by a
``queue.SimpleQueue``. A job :meth:`~ComputeThreads.post`-ed to them posts its result to the loop as its thread's
last act and the thread blocks on the queue at once, releasing the GIL to the loop it just woke; a
``ThreadPoolExecutor`` thread first settles its own ``concurrent.futures.Future`` (a condition lock, callbacks) and
its idle semaphore, the loop waiting on the GIL meanwhile (~80 us in the 803 KB frame's trace). It is an
``Executor`` too (``submit``, ``shutdown``), so ``run_in_executor`` jobs (model loads) share its threads and bound.

The slot a frame holds is given back (``on_end``) when the compute has really ended, not when its waiter
stops waiting: a caller that is cancelled or times out cannot pile work up past the queue bound.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Protocol


def submit(executor: Executor, fn: Callable[[], Any], on_end: Callable[[], None] | None = None) -> asyncio.Future[Any]:
    """Run ``fn()`` on ``executor``; the future (of the running loop) gets its result or exception.
    ``on_end()`` runs on the loop once ``fn`` has ended, whether or not anyone still waits (a cancelled
    future drops the result). Raises RuntimeError where the executor is shut down (``on_end`` not called)."""
    if isinstance(executor, ComputeThreads):
        return executor.post(fn, on_end)
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()
    job = _Posted(loop, fut, fn, on_end, None)
    executor.submit(job.run)
    return fut


Then = Callable[[Any, BaseException | None], None]  # post's ``then``: (result, None) or (None, the error)


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None, on_end: Callable[[], None] | None,
            then: Then | None = None) -> None:
    try:
        if on_end is not None:
            on_end()
    finally:
        if not fut.done():  # else its waiter was cancelled: the result (or error) is dropped
            if error is not None:
                fut.set_exception(error)
                if then is not None:
                    fut.exception()  # ``then`` takes it: not "never retrieved" when nobody awaits the future
            else:
                fut.set_result(value)
        if then is not None:
            then(value, error)


class _Job(Protocol):
    def run(self) -> None: ...

    def cancel(self, error: BaseException) -> None: ...


class _Posted:
    """A job whose result goes to an asyncio future: ``call_soon_threadsafe`` is the last thing it does."""

    __slots__ = ("fn", "fut", "loop", "on_end", "then")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], fn: Callable[[], Any],
                 on_end: Callable[[], None] | None, then: Then | None):
        self.loop, self.fut, self.fn, self.on_end, self.then = loop, fut, fn, on_end, then

    def run(self) -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = self.fn()
        except BaseException as e:  # handed to the waiter, as run_in_executor would
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the process is ending, nobody waits
            self.loop.call_soon_threadsafe(_settle, self.fut, value, error, self.on_end, self.then)

    def cancel(self, error: BaseException) -> None:
        """Never started (the threads were shut down): the waiter gets ``error``, the slot is given back."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.fut, None, error, self.on_end, self.then)


class _Call:
    """A plain ``Executor.submit`` job (``run_in_executor``): its ``concurrent.futures.Future``."""

    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.future: Future[Any] = Future()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            value = self.fn(*self.args, **self.kwargs)
        except BaseException as e:
            self.future.set_exception(e)
        else:
            self.future.set_result(value)

    def cancel(self, error: BaseException) -> None:
        self.future.cancel()


def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """A compute thread: run jobs until the ``None`` that ends the pool (passed on to the next thread)."""
    while (job := jobs.get()) is not None:
        job.run()
        del job  # nothing of the frame kept while blocked
    jobs.put(None)


# every pool's threads and queue, ended and joined at exit (a daemon thread is not joined by the interpreter)
_running: weakref.WeakKeyDictionary[threading.Thread, queue.SimpleQueue[_Job | None]] = weakref.WeakKeyDictionary()


@atexit.register
def _at_exit() -> None:
    items = list(_running.items())
    for _thread, jobs in items:
        jobs.put(None)
    for thread, _jobs in items:
        thread.join()


def _unshut() -> BaseException:
    return RuntimeError("the compute threads were shut down before this job started")


class ComputeThreads(Executor):
    """``max_workers`` dedicated threads on one ``queue.SimpleQueue``: :meth:`post` for frames (the result posted
    straight to the loop), :meth:`submit` for anything else. Threads start on the first job. ``shutdown(
    cancel_futures=True)`` drops the jobs not yet started: a posted one's waiter gets ``on_shutdown()`` (and its
    ``on_end`` runs), a submitted one's future is cancelled; running jobs finish."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "compute",
                 on_shutdown: Callable[[], BaseException] = _unshut):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._on_shutdown = on_shutdown
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shut = False
        weakref.finalize(self, self._jobs.put, None)  # dropped without shutdown: its threads end

    def post(self, fn: Callable[[], Any], on_end: Callable[[], None] | None = None,
             then: Then | None = None) -> asyncio.Future[Any]:
        """``submit(self, fn, on_end)`` of this module: the running loop's future gets ``fn()``'s result or error.
        ``then(result, error)`` runs on the loop right after (the same callback, no task to wake; it must not
        raise), whether or not the future is still awaited: a caller with nothing to await passes it alone."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._put(_Posted(loop, fut, fn, on_end, then))
        return fut

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        job = _Call(fn, args, kwargs)
        self._put(job)
        return job.future

    def _put(self, job: _Job) -> None:
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            self._jobs.put(job)
            if not self._threads:
                self._start()

    def _start(self) -> None:
        for i in range(self._max):
            thread = threading.Thread(target=_serve, args=(self._jobs,), name=f"{self._prefix}_{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
            _running[thread] = self._jobs

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            dropped: list[_Job] = []
            while cancel_futures:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    dropped.append(job)
            self._jobs.put(None)
        for job in dropped:
            job.cancel(self._on_shutdown())
        if wait:
            for thread in self._threads:
                thread.join()
