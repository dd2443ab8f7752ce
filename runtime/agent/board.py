"""The board thread: the agent's one thread for a frame's board work (head, TL encoder, codec encode, the local
tail), fed by a ``queue.SimpleQueue``; each job's result (or exception) goes to a future of the event loop that
handed it over in one ``call_soon_threadsafe``, the job's last act before the thread blocks for the next one.

In place of a one-worker ``ThreadPoolExecutor`` + ``runtime.wire.handoff.submit`` (issue 14): after the job, the
executor's thread also settled a ``concurrent.futures.Future`` (its condition lock and notify), released its idle
semaphore and dropped the work item before it blocked, holding the GIL the loop needs to take the result
(~80 us in a perf trace; runtime/measure/results/overhead.md, "Measured, not built: a dedicated hand-off thread":
job end -> the loop's callback 64 us p50 that way, 45 us this way).

The slot a job holds is given back (``on_end``, on the loop) when the job has really ended, whether or not anyone
still waits for it: a frame that is cancelled leaves its job to finish and its result is dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

# a job: (loop, its future, the work, on_end) for hand(); (None, a concurrent.futures.Future, the work, None) for submit()
_Job = tuple[asyncio.AbstractEventLoop | None, Any, Callable[[], Any], Callable[[], None] | None]


class BoardThread:
    """One worker thread, started with the first job and ended by :meth:`shutdown` (jobs queued before it still
    run, as ``ThreadPoolExecutor.shutdown`` runs them)."""

    def __init__(self, name: str = "board"):
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the thread's start and shutdown (submit may come from any thread)
        self._shutdown = False

    def hand(self, fn: Callable[[], Any], on_end: Callable[[], None] | None = None) -> asyncio.Future[Any]:
        """Run ``fn()`` on the board thread; the future (of the running loop) gets its result or exception.
        ``on_end()`` runs on the loop once ``fn`` has ended, whether or not anyone still waits (a cancelled future
        drops the result). Raises RuntimeError after :meth:`shutdown` (``on_end`` not called)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._put((loop, fut, fn, on_end))
        return fut

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """``ThreadPoolExecutor.submit``'s contract, for callers off the frame path (a measuring tool's job that
        must run on this thread): a ``concurrent.futures.Future`` of ``fn(*args, **kwargs)``."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._put((None, fut, lambda: fn(*args, **kwargs), None))
        return fut

    def _put(self, job: _Job) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"the {self.name} thread is shut down")
            if self._thread is None:
                # a daemon: an agent never closed does not hold the interpreter's exit (close() ends it)
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._jobs.put(job)

    def _run(self) -> None:
        get = self._jobs.get
        while True:
            job = get()
            if job is None:
                return
            loop, fut, fn, on_end = job
            job = None  # the job's references (its frame's tensors) go with it, not kept until the next one
            if loop is None:  # submit(): a concurrent.futures.Future
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the waiter, as an executor would
                        fut.set_exception(e)
                continue
            value: Any = None
            error: BaseException | None = None
            try:
                value = fn()
            except BaseException as e:  # handed to the waiter, as run_in_executor would
                error = e
            fn = None  # type: ignore[assignment]  # as job: dropped before the thread blocks
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the process is ending, nobody waits
                loop.call_soon_threadsafe(_settle, fut, value, error, on_end)
            value = error = fut = None

    def shutdown(self, wait: bool = False) -> None:
        """No more jobs; the thread ends once those queued have run (``wait``: block until it has)."""
        with self._lock:
            if not self._shutdown:
                self._shutdown = True
                if self._thread is not None:
                    self._jobs.put(None)
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None,
            on_end: Callable[[], None] | None) -> None:
    try:
        if on_end is not None:
            on_end()
    finally:
        if not fut.done():  # else its waiter was cancelled: the result (or error) is dropped
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)
