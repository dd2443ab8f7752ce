"""How steady the emulated board is at one fixed quota: blocks of whole-model passes, unrestricted and under the
quota, in turn, each block's median wall time and thread CPU per pass (the evidence behind calibrate.py).

    python -m runtime.measure.scenarios.drift --model mobilenet_v2 --quota-us 4769 --passes 12 --blocks 6

Each block and mode prints the passes' wall time under the quota (p10/p50/p90, mean, min, max), the thread CPU a
pass costs there (p50) and the slowdown against that block's free passes. ``--period-us`` sets the cfs period (the
quota's time step); scale ``--quota-us`` with it to keep the same share.

Modes per block (``--modes``, in turn): ``b2b`` passes back to back (the local run's way), ``gap`` one quota period
idle before each pass (a frame's head's way), ``pin0``/``pin1`` back to back pinned to that CPU, ``b2b-hi`` back to
back with the group's cpu.shares at the maximum (it wins the CPU whenever its quota allows). ``--busy N`` runs N
busy loops beside it (other work on the machine), ``--idle-spin N`` N busy loops at SCHED_IDLE (they take the CPU
only when nothing else wants it, so the CPUs never go idle); both stopped at the end. Needs root and cgroup v1 cpu; the group is
removed at the end."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

MODES = ("b2b", "gap", "pin0", "pin1", "b2b-hi")
HIGH_SHARES = 262_144  # cgroup v1 cpu.shares maximum (default 1024)


def _passes(loaded: Any, xs: list[Any], n: int, gap_s: float) -> tuple[list[float], list[float]]:
    import torch

    wall, cpu = [], []
    with torch.inference_mode():
        for i in range(n):
            time.sleep(gap_s)
            t, c = time.perf_counter(), time.thread_time()
            loaded.full(xs[i % len(xs)])
            wall.append((time.perf_counter() - t) * 1e3)
            cpu.append((time.thread_time() - c) * 1e3)
    return wall, cpu


def run(model: str, quota_us: int, period_us: int, passes: int, blocks: int, modes: list[str],
        busy: int = 0, spin: int = 0) -> list[dict[str, Any]]:
    import torch

    from runtime.agent.sources import open_source
    from runtime.daemon.cgroup import ROOT, CpuQuota
    from runtime.models.loader import load_model
    from runtime.wire import eventloop

    eventloop.tune_malloc()  # glibc's allocator as the board child and the agent set it (device.main): without it
    # every pass faults fresh pages in, and the free pass ran 20-24 ms here against bench-scenarios' 15.5-16.9 (q5)
    torch.set_num_threads(1)
    loaded = load_model(model)
    xs = [f.tensor for f in open_source(loaded.spec, "samples", 20)]
    everywhere = os.sched_getaffinity(0)
    cg = CpuQuota(f"edgesplit-drift-{os.getpid()}", period_us, quota_us)
    out = []
    loop = "import os, time\n{}t = time.monotonic() + 600\nwhile time.monotonic() < t: pass"
    idle = "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    loops = [subprocess.Popen([sys.executable, "-c", loop.format(idle if spin else "")]) for _ in range(busy or spin)]
    try:
        _passes(loaded, xs, 2, 0.0)
        for b in range(blocks):
            (ROOT / "cgroup.procs").write_text(str(os.getpid()))
            os.sched_setaffinity(0, everywhere)
            free = statistics.median(_passes(loaded, xs, passes, 0.0)[0])
            (cg.path / "cgroup.procs").write_text(str(os.getpid()))
            for mode in modes:
                os.sched_setaffinity(0, {int(mode[3:])} if mode.startswith("pin") else everywhere)
                (cg.path / "cpu.shares").write_text(str(HIGH_SHARES if mode == "b2b-hi" else 1024))
                wall, cpu = _passes(loaded, xs, passes, period_us / 1e6 if mode == "gap" else 0.0)
                deciles = statistics.quantiles(wall, n=10, method="inclusive") if len(wall) > 1 else wall * 9
                row = {"block": b, "mode": mode, "free_ms": free, "wall_p50_ms": statistics.median(wall),
                       "wall_p10_ms": deciles[0], "wall_p90_ms": deciles[-1],
                       "wall_mean_ms": statistics.mean(wall), "cpu_p50_ms": statistics.median(cpu),
                       "slowdown": statistics.median(wall) / free}
                out.append(row)
                print(f"block {b} {mode}: free {free:.1f} ms; under the quota p10/p50/p90 {row['wall_p10_ms']:.0f}/"
                      f"{row['wall_p50_ms']:.0f}/{row['wall_p90_ms']:.0f} ms (mean {row['wall_mean_ms']:.0f}, "
                      f"min {min(wall):.0f}, max {max(wall):.0f}), thread CPU p50 "
                      f"{row['cpu_p50_ms']:.1f} ms; slowdown {row['slowdown']:.1f}x", flush=True)
    finally:
        for lp in loops:
            lp.kill()
            lp.wait()
        (ROOT / "cgroup.procs").write_text(str(os.getpid()))
        cg.remove()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.measure.scenarios.drift", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--quota-us", type=int, required=True, help="cfs quota (1000..period)")
    p.add_argument("--period-us", type=int, default=50_000)
    p.add_argument("--passes", type=int, default=12, help="passes per block and mode (1..200)")
    p.add_argument("--blocks", type=int, default=6, help="blocks (1..50)")
    p.add_argument("--modes", default="b2b", help=f"comma-separated, of {', '.join(MODES)} (default: b2b)")
    p.add_argument("--busy", type=int, default=0, help="busy loops beside the board (0..4; each stops after 600 s)")
    p.add_argument("--idle-spin", type=int, default=0,
                   help="busy loops at SCHED_IDLE instead (they run only when nothing else would: the CPUs never halt)")
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    if (not 1000 <= a.quota_us <= a.period_us or not 1 <= a.passes <= 200 or not 1 <= a.blocks <= 50
            or not modes or any(m not in MODES for m in modes) or not 0 <= a.busy <= 4 or not 0 <= a.idle_spin <= 4 or (a.busy and a.idle_spin)):
        print(f"error: --quota-us 1000..period, --passes 1..200, --blocks 1..50, --modes of {', '.join(MODES)}",
              file=sys.stderr)
        return 2
    run(a.model, a.quota_us, a.period_us, a.passes, a.blocks, modes, a.busy, a.idle_spin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
