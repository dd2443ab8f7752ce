"""The cost of handing a frame's board work back to the event loop under a CFS CPU quota (issue 14).

    python -m runtime.measure.board_handoff --quota-us 3300 --period-us 50000 --job-ms 9 --frames 30 --rounds 2

Each mode runs in a child process in a fresh cgroup v1 ``cpu`` group with the quota (the headline's emulated board,
``runtime.daemon.cgroup``; removed at the end, on an error and on Ctrl-C too): ``--frames`` jobs of ``--job-ms`` of
CPU (a torch matmul loop, one torch thread, calibrated unrestricted first), ``--gap-ms`` idle after each (a frame's
link and worker time), and after each job:

- ``thread``: the job on a one-thread executor through ``runtime.wire.handoff.submit``, as the agent's board thread
  runs a head: ``handback`` = the job's end (on the board thread) -> the awaiting coroutine running on the loop;
- ``pinned``: the same with every thread of the process on one CPU (``os.sched_setaffinity`` before torch loads);
- ``inline``: the job on the loop's own thread, then one pass of the loop (``await asyncio.sleep(0)``), as the agent
  runs a lone frame's head there: ``handback`` = the job's end -> the coroutine running after that pass.

Beside it ``after_job``: the job's own thread running ~0.05 ms of Python right after the job (does the quota have
room left when the job ends?). It prints per mode the handback's median, p90 and max, the hand-backs over 20 ms
(a quota period's wait), the after-job ones over 20 ms and the job's wall-time median; ``--json`` writes every
figure. Needs root and a cgroup v1 cpu hierarchy (else it says why and exits 2); ``--quota-us 0`` runs unrestricted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

MODES = ("thread", "pinned", "inline")
GROUP_PREFIX = "edgesplit-handoff-"
STALL_MS = 20.0  # a hand-back over this waited for the quota (a free CPU: 0.07-0.2 ms)
CHILD_TIMEOUT_S = 600.0


def _child(mode: str, cgroup: str, reps: int, frames: int, gap_s: float) -> dict[str, Any]:
    if mode == "pinned":
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # before torch and any thread: they all inherit it
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from runtime.wire import eventloop, handoff

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    after: list[float] = []

    def job() -> float:
        for _ in range(reps):
            torch.mm(a, a)
        end = time.perf_counter()
        x = 0
        for i in range(500):  # ~0.05 ms of Python on the job's own thread
            x += i
        after.append((time.perf_counter() - end) * 1e3)
        return end

    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:  # after torch loaded: under a quota it takes minutes
            f.write(str(os.getpid()))
    board = ThreadPoolExecutor(max_workers=1, thread_name_prefix="board")

    async def run() -> dict[str, Any]:
        back, wall = [], []
        for _ in range(frames):
            t0 = time.perf_counter()
            if mode == "inline":
                end = job()
                await asyncio.sleep(0)
            else:
                end = await handoff.submit(board, job)
            now = time.perf_counter()
            back.append((now - end) * 1e3)
            wall.append((end - t0) * 1e3)
            await asyncio.sleep(gap_s)
        return {"handback_ms": back, "job_wall_ms": wall, "after_job_ms": after}

    try:
        return eventloop.run(run())
    finally:
        board.shutdown()


def _reps_for(job_ms: float) -> int:
    """Matmuls of 256 x 256 (one torch thread) that take ``job_ms`` of CPU here, unrestricted."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    for _ in range(20):
        torch.mm(a, a)
    t = time.process_time()
    for _ in range(200):
        torch.mm(a, a)
    per = (time.process_time() - t) / 200 * 1e3
    return max(1, round(job_ms / per))


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per mode, over its rounds' frames: the hand-back's median / p90 / max, the stalls, the job's wall time."""
    out = {}
    for mode in MODES:
        got = [r for r in runs if r["mode"] == mode]
        if not got:
            continue
        back = [v for r in got for v in r["handback_ms"]]
        after = [v for r in got for v in r["after_job_ms"]]
        out[mode] = {"frames": len(back), "handback_p50_ms": statistics.median(back),
                     "handback_p90_ms": _pct(back, 0.9), "handback_max_ms": max(back),
                     "handback_stalls": sum(v > STALL_MS for v in back),
                     "after_job_stalls": sum(v > STALL_MS for v in after),
                     "job_wall_p50_ms": statistics.median(v for r in got for v in r["job_wall_ms"])}
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.measure.board_handoff", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quota-us", type=int, default=3300, help="CPU quota per period (0: unrestricted)")
    p.add_argument("--period-us", type=int, default=50_000, help="the quota's period (1000..1000000 us)")
    p.add_argument("--job-ms", type=float, default=9.0, help="CPU per job, unrestricted (0.1..1000 ms)")
    p.add_argument("--frames", type=int, default=30, help="jobs per mode and round (1..1000)")
    p.add_argument("--gap-ms", type=float, default=170.0, help="idle after each job (0..5000 ms)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, the modes in turn in each (1..20)")
    p.add_argument("--json", default="", help="write every figure here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # MODE,CGROUP,REPS: one mode's process
    args = p.parse_args(argv)
    for name, lo, hi in (("quota_us", 0, 10**6), ("period_us", 1000, 10**6), ("job_ms", 0.1, 1000),
                         ("frames", 1, 1000), ("gap_ms", 0, 5000), ("rounds", 1, 20)):
        if not lo <= getattr(args, name) <= hi:
            p.error(f"--{name.replace('_', '-')} must be {lo}..{hi}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        mode, cgroup, reps = args.child.split(",")
        print(json.dumps(_child(mode, cgroup, int(reps), args.frames, args.gap_ms / 1e3)))
        return 0
    from runtime.daemon.cgroup import CpuQuota, unavailable

    if args.quota_us and (why := unavailable()):
        print(f"cannot run under a CPU quota: {why}", file=sys.stderr)
        return 2
    reps = _reps_for(args.job_ms)
    runs: list[dict[str, Any]] = []
    groups: list[CpuQuota] = []
    try:
        for rnd in range(args.rounds):
            for mode in MODES:
                path = ""
                if args.quota_us:
                    groups.append(CpuQuota(f"{GROUP_PREFIX}{os.getpid()}-{len(groups)}", args.period_us, args.quota_us))
                    path = str(groups[-1].path)
                cmd = [sys.executable, "-m", "runtime.measure.board_handoff", "--frames", str(args.frames),
                       "--gap-ms", str(args.gap_ms), "--child", f"{mode},{path},{reps}"]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=True)
                runs.append({"mode": mode, "round": rnd, **json.loads(out.stdout.strip().splitlines()[-1])})
    finally:  # an error and Ctrl-C too (the child got the SIGINT as well)
        for g in groups:
            g.remove()
    summary = summarise(runs)
    print(f"quota {args.quota_us} us / {args.period_us} us, jobs of {args.job_ms:g} ms CPU ({reps} matmuls), "
          f"{args.gap_ms:g} ms idle after each, {args.frames} frames x {args.rounds} rounds per mode")
    print(f"{'mode':<8}{'handback p50':>14}{'p90':>8}{'max':>8}{'> 20 ms':>9}{'after-job > 20 ms':>19}{'job wall p50':>14}")
    for mode, s in summary.items():
        print(f"{mode:<8}{s['handback_p50_ms']:>14.2f}{s['handback_p90_ms']:>8.2f}{s['handback_max_ms']:>8.1f}"
              f"{s['handback_stalls']:>5}/{s['frames']:<3}{s['after_job_stalls']:>15}/{s['frames']:<3}"
              f"{s['job_wall_p50_ms']:>14.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "child"}, "reps": reps,
                       "summary": summary, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
