"""The event loop the daemons and the agent run on: uvloop where it is installed, else asyncio's own.

Measured on the frame path (``edgesplit bench --split 45 --split 10 --codec raw``, both processes on uvloop
against both on asyncio, alternating, seven pairs of runs in three locked sessions; runtime/measure/results/overhead.md):
runtime overhead p50 0.1-0.6 ms lower in 13 of 14 comparisons (62 KB 2.47 / 2.62 against 2.96 / 2.84 ms, 803 KB
4.50 / 4.37 against 4.72 / 4.48 ms in the 19:27 pairs): uvloop's loop pass and wake-ups are C, asyncio's Python.

``EDGESPLIT_EVENT_LOOP=asyncio`` keeps asyncio's loop (to compare, or where uvloop misbehaves).

``run`` also sets glibc's allocator (:func:`tune_malloc`) so that buffers of a frame's size and a model's
activations reuse memory the process already has instead of new pages. With glibc's defaults, blocks above its
adaptive mmap threshold are mapped and unmapped each time, and freed heap above twice that threshold is given
back: every frame then faults fresh pages in (each costs ~2.5 us on this VM, zeroing included). Measured
(runtime/measure/results/overhead.md, 16:33-16:45 UTC 2026-12-04): ``edgesplit bench --split 10 --codec raw``
took ~3,560 minor faults a frame (agent and worker) with the defaults and none with these settings. In ten
alternating pairs (two runs, 16:43 and 16:54) the compute moved most: the board head at split 45 21.1 -> 10.5 and
18.5 -> 10.7 ms (10 of 10 lower), the local full model 32.4 -> 23.3 and 30.3 -> 24.0 ms (9 of 10); end-to-end p50
at 62 KB 41.3 -> 28.7 and 35.4 -> 29.3 ms (10 of 10), at 803 KB (a light head, the tail's share varies more)
36.7 -> 28.6 and 31.9 -> 29.5 ms (6 of 10). The runtime overhead did not move (803 KB lower in 10 of 19 pairs
over four runs). In a two-process echo of the frame path, an 803 KB frame's serialisation faulted 164 pages in
(0.4-0.6 ms against 0.1 ms warm) and the round trip fell from 2.76 to 1.63 ms; the bench's overhead shows no such
step (its processes' heaps, which the models keep large, may hold that memory already: not checked).
``EDGESPLIT_MALLOC=default`` leaves glibc's defaults, as does a process started with its own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` / ``GLIBC_TUNABLES``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "EDGESPLIT_EVENT_LOOP"  # "asyncio" or "uvloop" (the default when installed)
MALLOC_ENV = "EDGESPLIT_MALLOC"  # "default": leave glibc's allocator as it is
# blocks up to this come from the heap, not a mapping of their own: above the 8 MiB message cap
# (TransportOptions.max_message_bytes), so no frame's buffer is mapped and unmapped per frame
MMAP_THRESHOLD_BYTES = 16 * 2**20
# freed heap is given back to the system only above this (per arena): a few frames' buffers at the cap stay
# mapped for the next frame. Memory is kept only up to what the process once used at its peak.
TRIM_THRESHOLD_BYTES = 128 * 2**20
_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def loop_name() -> str:
    """The loop ``run`` uses here: "uvloop" or "asyncio"."""
    if os.environ.get(ENV, "").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds (MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES) for this process;
    False where it left them: ``EDGESPLIT_MALLOC=default``, the user's own malloc settings, or a C library
    without glibc's ``mallopt`` (musl's does nothing and says so; macOS has none)."""
    if os.environ.get(MALLOC_ENV, "").strip().lower() == "default" or any(k in os.environ for k in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return bool(mapped) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


class Loop:
    """One event loop for a process that runs several coroutines one after another (a benchmark's jobs, one per
    strategy or codec), on the loop :func:`run` picks, with glibc's allocator set.

    ``run`` once per job would give each job a new loop. With gRPC's EventEngine off (the CLI's default,
    runtime/cli/__init__.py), grpc.aio's poller then delivers the late events of an earlier job's calls (a closed
    channel's last completions) to that job's closed loop: "RuntimeError: Event loop is closed" tracebacks, harmless
    but printed. Here every job runs on the one loop; after each, the tasks it left are cancelled and awaited, as
    ``asyncio.run`` does, so nothing of one job runs into the next (a benchmark's board would pay for it)."""

    def __init__(self) -> None:
        tune_malloc()
        if loop_name() == "uvloop":
            import uvloop

            self._runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        else:
            self._runner = asyncio.Runner()

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        try:
            return self._runner.run(main)
        finally:
            self._runner.run(_cancel_left_tasks())

    def close(self) -> None:
        self._runner.close()

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _cancel_left_tasks() -> None:
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``loop_name`` names, with glibc's allocator set (``tune_malloc``): one
    :class:`Loop`, closed after ``main``."""
    with Loop() as loop:
        return loop.run(main)
