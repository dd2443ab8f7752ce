"""How much a CPU quota looks like a slower CPU, by period (issue 13: dpfp_bench's --period-us).

    python -m runtime.tools.dpfp_period --share 0.4 --periods 10000,5000,2500 --work-ms 1,5,20

A board at 0.4 of this machine's core would run everything 2.5x slower, evenly. A cgroup v1 quota
of 0.4 core instead runs a process at full speed for 0.4 x period and stops it for the rest. For
each period this runs one process (one thread) in such a quota that does units of pure-Python work
of ``--work-ms`` milliseconds of CPU each, back to back, and prints each unit's wall time divided
by its CPU time: 1/share (2.5) for every unit is a slower CPU; the spread (p10..p90, max) is what
the stop-and-go adds. The kernel's tick (CONFIG_HZ) bounds how finely the quota is enforced.
Without cgroup v1 (or root) it exits 2 saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.tools.cpuquota import QuotaSet

CHILD = """
import json, sys, time
work_ms, seconds = [float(x) for x in sys.argv[1].split(",")], float(sys.argv[2])
def spin(n):
    x = 0
    for i in range(n):
        x += i
    return x
t = time.thread_time(); spin(200_000); per = (time.thread_time() - t) / 200_000  # CPU seconds per step
sys.stdin.readline()  # moved into the quota
out = {}
for ms in work_ms:
    n, ratios, end = max(1, int(ms / 1e3 / per)), [], time.perf_counter() + seconds
    w, c = time.perf_counter(), time.thread_time()
    while w < end:  # from one unit's start to the next: a stall lands wherever the kernel throttles
        spin(n)
        w2, c2 = time.perf_counter(), time.thread_time()
        ratios.append((w2 - w) / max(c2 - c, 1e-9))
        w, c = w2, c2
    out[str(ms)] = ratios
print(json.dumps(out))
"""


def measure(quotas: QuotaSet, share: float, period_us: int, work_ms: list[float], seconds: float) -> dict[str, list[float]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, ",".join(map(str, work_ms)), str(seconds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    quotas.new(share, period_us).add(proc.pid)
    out, _ = proc.communicate("go\n", timeout=60 + 4 * seconds * len(work_ms))
    ratios: dict[str, list[float]] = json.loads(out)
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.dpfp_period", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--share", type=float, default=0.4, help="CPU quota, in cores")
    p.add_argument("--periods", default="10000,5000,2500", help="cgroup periods to compare (us)")
    p.add_argument("--work-ms", default="1,5,20", help="CPU milliseconds per unit of work")
    p.add_argument("--seconds", type=float, default=3.0, help="wall seconds per period and unit size")
    args = p.parse_args(argv)
    periods, work = [int(x) for x in args.periods.split(",")], [float(x) for x in args.work_ms.split(",")]
    if not (0 < args.share <= 1 and 0 < args.seconds <= 60 and all(0 < w <= 1000 for w in work)
            and all(1000 <= x <= 1_000_000 and args.share * x >= 1000 for x in periods)):
        p.error("--share 0..1, --seconds 0..60, --work-ms 0..1000 each, --periods 1000..1000000 each with a quota "
                "(share x period) of at least the kernel's 1000 us")
    from runtime.daemon.cgroup import unavailable
    from runtime.tools.cpuquota import QuotaSet

    why = unavailable()
    if why:
        print(f"dpfp_period: no CPU quotas ({why}); not run", file=sys.stderr)
        return 2
    load = os.getloadavg()
    rows = []
    with QuotaSet(f"edgesplit-period-{os.getpid()}") as q:
        for period in periods:
            for ms, ratios in measure(q, args.share, period, work, args.seconds).items():
                r = sorted(ratios)
                rows.append((period, ms, len(r), r[len(r) // 10], statistics.median(r), r[len(r) * 9 // 10], r[-1]))
    print(f"share {args.share:g} core (a slower CPU: wall / CPU = {1 / args.share:.2f} for every unit); load average "
          f"{' / '.join(f'{v:.2f}' for v in load)} before, {' / '.join(f'{v:.2f}' for v in os.getloadavg())} after; "
          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    print("| period us | quota us | CPU ms per unit | units | wall/CPU p10 | p50 | p90 | max |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for period, ms, n, p10, p50, p90, top in rows:
        print(f"| {period:,} | {round(args.share * period):,} | {ms} | {n} | {p10:.2f} | {p50:.2f} | {p90:.2f} | {top:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
