"""What the planner's store writes cost, per engine: ``python -m planner.store_bench --store URL_OR_PATH``.

Prints, for ``--agents`` agents with ``--workers`` links each:

* the writes made before an RPC is answered (registration ``put_agent``, ``issue_plan``), p50/p99,
  on the calling thread (the event loop); then each agent registered again, with the same profile and
  with a new one;
* one write-behind flush of every agent's links and heartbeat (one transaction), and how long the
  event loop stalls while it runs on the store thread (a 1 ms ticker's worst lateness) compared
  with the same batch written on the loop;
* ``issue_plan`` as the planner calls it (awaited on the store thread) and on the loop: per-call
  latency and the loop's worst stall meanwhile;
* a replica keeping ``--agents`` leases alive: every lease row renewed (how it was done until the
  heartbeat) against its heartbeat (:mod:`planner.store_leases`), per flush.

Results and the exact commands: planner/results/replicas.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
from collections.abc import Awaitable, Callable

from planner.store import AgentRecord, Batch, LinkRecord, Store
from planner.writebehind import WriteBehind
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

PROFILE = '{"machine": "bench", "role": "device", "model": "m", "blocks": []}'  # stored, never parsed here


def _ms(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3


def immediate(store: Store, n: int) -> None:
    reg, plan = [], []
    for i in range(n):
        t = time.perf_counter()
        store.put_agent(AgentRecord(f"b{i}", "m", "d", PROFILE, ("w0",), (), pb.Constraints(), 1.0, 1.0))
        reg.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.issue_plan(pb.Plan(agent_id=f"b{i}", split_id="conv2", worker_id="w0", reason="bench"))
        plan.append(time.perf_counter() - t)
    print(f"  put_agent  p50 {_ms(reg, 0.5):.3f} ms  p99 {_ms(reg, 0.99):.3f} ms  ({n} calls)")
    print(f"  issue_plan p50 {_ms(plan, 0.5):.3f} ms  p99 {_ms(plan, 0.99):.3f} ms")
    for what, new_text in (("same profile", False), ("new profile", True)):
        again = []
        for i in range(n):  # registered again: the old profile text is deleted when its last agent moves off it
            text = PROFILE.replace("bench", f"b{i}") if new_text else PROFILE
            t = time.perf_counter()
            store.put_agent(AgentRecord(f"b{i}", "m", "d", text, ("w0",), (), pb.Constraints(), 1.0, 1.0))
            again.append(time.perf_counter() - t)
        print(f"  put_agent again, {what}: p50 {_ms(again, 0.5):.3f} ms  p99 {_ms(again, 0.99):.3f} ms")


def _batch(agents: int, workers: int, base: float) -> Batch:
    b = Batch()
    for i in range(agents):
        for w in range(workers):
            b.links[(f"b{i}", f"w{w}")] = LinkRecord(0.005, 1e6 + i + base, base)
        b.seen[f"b{i}"] = base
    return b


async def _lag_while(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(seconds ``work`` took, the worst lateness of a 1 ms ticker meanwhile)."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    await work()
    took = time.perf_counter() - start
    done = True
    await task
    return took, worst


async def flushes(store: Store, agents: int, workers: int, runs: int) -> None:
    wb = WriteBehind(store)
    off, on = [], []
    try:
        for r in range(runs):
            wb.pending = _batch(agents, workers, 1000.0 + r)
            off.append(await _lag_while(wb.flush))

            async def on_loop(r: int = r) -> None:
                store.write_batch(_batch(agents, workers, 2000.0 + r))

            on.append(await _lag_while(on_loop))
    finally:
        await wb.close()
    rows = agents * (workers + 1)
    for name, xs in (("store thread", off), ("on the loop ", on)):
        print(f"  flush {rows} rows, {name}: {statistics.median(x[0] for x in xs) * 1e3:.1f} ms median; "
              f"loop stalled {statistics.median(x[1] for x in xs) * 1e3:.1f} ms median, {max(x[1] for x in xs) * 1e3:.1f} ms max"
              f" ({runs} runs)")


async def plan_writes(store: Store, n: int) -> None:
    """``n`` plans written as the planner writes them now (awaited on the store thread) and as it did
    (on the event loop): per-call latency and the loop's stall meanwhile."""
    wb = WriteBehind(store)
    try:
        for name, on_thread in (("store thread", True), ("on the loop ", False)):
            calls: list[float] = []

            async def write(on_thread: bool = on_thread, calls: list[float] = calls) -> None:
                for i in range(n):
                    t = time.perf_counter()
                    plan = pb.Plan(agent_id=f"b{i}", split_id="conv2", worker_id="w0", reason="bench")
                    if on_thread:
                        await wb.write(functools.partial(Store.issue_plan, plan=plan))
                    else:
                        store.issue_plan(plan)
                    calls.append(time.perf_counter() - t)
                    await asyncio.sleep(0)

            _, worst = await _lag_while(write)
            print(f"  issue_plan, {name}: p50 {_ms(calls, 0.5):.3f} ms  p99 {_ms(calls, 0.99):.3f} ms per call; "
                  f"loop stalled {worst * 1e3:.1f} ms max ({n} calls)")
    finally:
        await wb.close()


def lease_renewals(store: Store, agents: int, runs: int) -> None:
    """A replica holding ``agents`` leases: renewing every lease row against one heartbeat, per flush."""
    b = store.backend
    store.start_replica("bench", 5.0)
    for i in range(0, agents, 500):
        part = [f"b{j}" for j in range(i, min(agents, i + 500))]
        with b.transaction():
            b.execute(f"INSERT INTO leases (agent_id, replica, expires_unix) VALUES {','.join(['(?, ?, 0)'] * len(part))} "
                      "ON CONFLICT (agent_id) DO NOTHING", tuple(x for a in part for x in (a, "bench")))
    for name, renew in (("every lease row", lambda: store.renew_leases("bench", 5.0)),
                        ("heartbeat      ", lambda: store.heartbeat("bench", 5.0))):
        wall, cpu = [], []
        for _ in range(runs):
            t, c = time.perf_counter(), time.process_time()
            renew()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        print(f"  lease renewal of {agents} agents, {name}: p50 {_ms(wall, 0.5):.2f} ms, max {_ms(wall, 1.0):.2f} ms; "
              f"this process's CPU p50 {_ms(cpu, 0.5):.2f} ms ({runs} runs)")
    store.release_leases("bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="postgresql://..., sqlite:///PATH or a path (a new, empty database)")
    ap.add_argument("--agents", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=1, help="links per agent")
    ap.add_argument("--calls", type=int, default=2_000, help="registrations and plans timed")
    ap.add_argument("--runs", type=int, default=5, help="flushes timed")
    args = ap.parse_args()
    store = Store(args.store)
    try:
        print(f"{store.backend.name}: {store.path}")
        immediate(store, args.calls)
        for i in range(args.agents):  # the heartbeats' rows exist
            if i >= args.calls:
                store.put_agent(AgentRecord(f"b{i}", "m", "d", PROFILE, ("w0",), (), pb.Constraints(), 1.0, 1.0))
        asyncio.run(flushes(store, args.agents, args.workers, args.runs))
        asyncio.run(plan_writes(store, args.calls))
        lease_renewals(store, args.agents, max(args.runs, 20))
    finally:
        store.close()


if __name__ == "__main__":
    main()
