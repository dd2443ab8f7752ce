"""The event loop the daemons and the agent run on: uvloop where it is installed, else asyncio's own.

Measured on the frame path (``edgesplit bench --split 45 --split 10 --codec raw``, both processes on uvloop
against both on asyncio, alternating, seven pairs of runs in three locked sessions; runtime/measure/results/overhead.md):
runtime overhead p50 0.1-0.6 ms lower in 13 of 14 comparisons (62 KB 2.47 / 2.62 against 2.96 / 2.84 ms, 803 KB
4.50 / 4.37 against 4.72 / 4.48 ms in the 19:27 pairs): uvloop's loop pass and wake-ups are C, asyncio's Python.

``EDGESPLIT_EVENT_LOOP=asyncio`` keeps asyncio's loop (to compare, or where uvloop misbehaves).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "EDGESPLIT_EVENT_LOOP"  # "asyncio" or "uvloop" (the default when installed)


def loop_name() -> str:
    """The loop ``run`` uses here: "uvloop" or "asyncio"."""
    if os.environ.get(ENV, "").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``loop_name`` names."""
    if loop_name() == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
