"""``python -m runtime.measure.fleet.gcpauses ARGS...``: ``edgesplit ARGS...`` with every collection of
the garbage collector's oldest generation timed (``bench-planner-fleet --gc-pauses``).

At exit it writes ``{"gen2_ms": [...in order], "young_over_20ms": [...], "frozen": N}`` as JSON to the
file named by ``EDGESPLIT_GC_PAUSES_OUT`` (the fleet report reads it): a full collection holds the
planner's event loop (health checks, plan pushes wait behind it), so these are its longest stalls
that no sampling profiler sees (the collector holds the interpreter lock throughout).
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import sys
import time

OUT_ENV = "EDGESPLIT_GC_PAUSES_OUT"
YOUNG_MS = 20.0  # a young-generation collection slower than this is listed too


def main() -> None:
    gen2: list[float] = []
    young: list[float] = []
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = round((time.perf_counter() - started[0]) * 1e3, 2)
        if info["generation"] == 2:
            gen2.append(ms)
        elif ms > YOUNG_MS:
            young.append(ms)

    def write() -> None:
        path = os.environ.get(OUT_ENV)
        if path:
            with open(path, "w") as f:
                json.dump({"gen2_ms": gen2, "young_over_20ms": young, "frozen": gc.get_freeze_count()}, f)

    gc.callbacks.append(timed)
    atexit.register(write)
    sys.argv = ["edgesplit", *sys.argv[1:]]
    runpy.run_module("runtime.cli.main", run_name="__main__")


if __name__ == "__main__":
    main()
