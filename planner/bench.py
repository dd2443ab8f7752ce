"""Planner decision time against model size: ``python -m planner.bench`` (``make bench-planner``).

Synthetic profiles (random block times and sizes, four transfers per block: raw, fp16+lz4,
int8+lz4, a TL) on device, edge and cloud; constraints on (raw input stays, upload cap, fidelity
floor). "warm" re-plans with profiles already seen (what live re-planning does when only the
network changes); "cold" includes building the per-profile transfer tables. Ranked by latency,
and at 600 blocks also by throughput (the slowest pipeline stage, which scores the transfer
combinations of the cut vectors that may enter the top 5).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import subprocess
import sys
import time

from planner.search import search
from planner.tables import SearchCache
from runtime.contracts.costmodel import Constraints, Link, Network, Tier
from runtime.contracts.profile import Block, Profile, Transfer
from runtime.contracts.tiers import CLOUD, DEVICE, EDGE


def synthetic(machine: str, role: str, n: int, speed: float, seed: int = 0) -> Profile:
    rnd = random.Random(seed)
    blocks = []
    for i in range(n):
        out = rnd.randint(10_000, 2_000_000)
        tr = (Transfer("raw", out, codec="raw"), Transfer("fp16+lz4", out // 2, 1e-4, 1e-4, codec="fp16+lz4"),
              Transfer("int8+lz4", out // 4, 2e-4, 2e-4, codec="int8+lz4"),
              Transfer("tl-x+int8+lz4", out // 16, 3e-4, 3e-4, codec="int8+lz4", tl_id="tl-x", fidelity=0.99))
        blocks.append(Block(i, f"b{i}", rnd.uniform(1e-4, 5e-3) / speed, out, param_bytes=rnd.randint(0, 10**6),
                            transfers=tr))
    return Profile(machine, role, "synthetic", tuple(blocks), 600_000)


def problem(n: int, machines: int) -> tuple[list[Tier], Network, Constraints]:
    tiers = [Tier(role, tuple(synthetic(f"{role}{m}", role, n, speed, seed=m) for m in range(machines if role != DEVICE else 1)))
             for role, speed in ((DEVICE, 1.0), (EDGE, 5.0), (CLOUD, 20.0))]
    net = Network({(DEVICE, EDGE): Link(0.01, 2e6), (EDGE, CLOUD): Link(0.02, 1e7), (DEVICE, CLOUD): Link(0.03, 2e6)})
    cons = Constraints(raw_input_stays=True, max_upload_bytes={DEVICE: 500_000}, min_fidelity=0.95)
    return tiers, net, cons


def first_call(n: int) -> float:
    """Milliseconds of the first search in this process (nothing cached, numpy's first calls included)."""
    tiers, net, cons = problem(n, 1)
    t = time.perf_counter()
    search(tiers, net, cons, "latency", top_n=5)
    return (time.perf_counter() - t) * 1e3


def fresh(n: int, processes: int) -> float:
    """The median over ``processes`` new Python processes of their first search (how a planner that has just
    started, or a one-off ``edgesplit plan``, sees it)."""
    code = f"from planner.bench import first_call; print(first_call({n}))"
    runs = [float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                 timeout=120).stdout) for _ in range(processes)]
    return statistics.median(runs)


def measure(n: int, machines: int, repeats: int, objective: str = "latency") -> tuple[float, float]:
    tiers, net, cons = problem(n, machines)
    cold, warm = [], []
    cache = SearchCache()  # what a re-planner keeps between decisions
    for _ in range(repeats):
        cache.tables.clear()
        t = time.perf_counter()
        search(tiers, net, cons, objective, top_n=5, cache=cache)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        search(tiers, net, cons, objective, top_n=5, cache=cache)
        warm.append(time.perf_counter() - t)
    return statistics.median(warm) * 1e3, statistics.median(cold) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, action="append", help="model sizes (default 25 100 200 400 600 1000)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--fresh", type=int, default=5, help="new processes timing their first 600-block search (0: skip)")
    args = ap.parse_args(argv)
    print(f"# planner decision time ({platform.processor() or platform.machine()}, python {platform.python_version()})")
    print("| blocks | tiers | machines per tier | objective | warm median ms | cold median ms |")
    print("|---:|---:|---:|:---|---:|---:|")
    for n in args.blocks or (25, 100, 200, 400, 600, 1000):
        rows = ((1, "latency"), (2, "latency"), (1, "throughput")) if n == 600 else ((1, "latency"),)
        for machines, objective in rows:
            warm, cold = measure(n, machines, args.repeats, objective)
            print(f"| {n} | 3 | {machines} | {objective} | {warm:.2f} | {cold:.2f} |", flush=True)
    if args.fresh > 0:
        print(f"\nFirst search in a fresh process (600 blocks, 3 tiers, latency), median of {args.fresh} processes: "
              f"{fresh(600, args.fresh):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
