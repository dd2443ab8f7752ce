"""A loader process: its share of the simulated agents on one asyncio loop, over a few channels.

The parent talks to it over a pipe: the loader registers its agents as soon as it starts (at most
``register_concurrency`` calls in flight), sends ``("registered", count, monotonic time)``,
receives ``(measure_start, measure_end)``, runs until ``measure_end`` and sends
``("stats", Stats.to_dict())``. Each channel is its own TCP connection (a local subchannel
pool), and agents take channels in turn.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import signal
import time
from dataclasses import dataclass
from typing import Any

import grpc

from runtime.measure.fleet.agent import Phase, Shared, SimAgent
from runtime.measure.fleet.options import FleetOptions
from runtime.measure.fleet.planner_proc import pin, sched_seconds
from runtime.measure.fleet.stats import Stats
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.wire.transport import TransportOptions

logger = logging.getLogger(__name__)
CLOSE_SECONDS = 15.0  # at the end, how long the agents may take to close their streams and read the acks


@dataclass(frozen=True)
class LoaderSpec:
    index: int
    first: int  # agent indices [first, last)
    last: int
    addresses: tuple[str, ...]  # the planner replicas' HOST:PORT (one without replicas)
    options: FleetOptions
    boards: tuple[str, ...]
    model: str
    digest: str
    workers: tuple[str, ...]
    cpus: tuple[int, ...]  # pin to these (empty: no pinning)


def channel(address: str, index: int) -> grpc.aio.Channel:
    # an agent's planner channel (runtime.daemon.planner_client: a control channel, keep-alive every 1 s)
    options = [*TransportOptions().channel_options(control=True), ("grpc.use_local_subchannel_pool", 1),
               ("edgesplit.fleet_channel", index)]  # distinct args: never shared with another channel
    return grpc.aio.insecure_channel(address, options=options)


def main(spec: LoaderSpec, conn: Any) -> None:
    """Process entry (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the planner, then us
    if spec.cpus:
        pin(0, list(spec.cpus))
    logging.basicConfig(level=logging.WARNING)
    stats = asyncio.run(_run(spec, conn))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats.cpu_seconds = usage.ru_utime + usage.ru_stime
    stats.wait_seconds = sched_seconds("self")[1]
    conn.send(("stats", stats.to_dict()))
    conn.close()


async def _run(spec: LoaderSpec, conn: Any) -> Stats:
    o = spec.options
    stats, phase = Stats(), Phase()
    rng = random.Random(o.seed * 1000 + spec.index)
    # o.channels connections to each replica; an agent's stubs: its own connection to each, its replica first
    channels = [channel(a, r * o.channels + i) for r, a in enumerate(spec.addresses) for i in range(o.channels)]
    stubs = [ppb_grpc.PlannerStub(c) for c in channels]  # type: ignore[no-untyped-call]  # generated, unannotated
    n_rep = len(spec.addresses)

    def stubs_of(i: int) -> list[ppb_grpc.PlannerStub]:
        k, home = (i - spec.first) % o.channels, i % n_rep
        return [stubs[((home + r) % n_rep) * o.channels + k] for r in range(n_rep)]

    n_step = round(o.step_fraction * o.agents)
    shared = Shared(o, stats, phase, spec.model, spec.digest)
    agents = [SimAgent(f"fleet-agent-{i:05d}", (i % len(spec.boards), spec.boards[i % len(spec.boards)]), stubs_of(i),
                       shared, stepping=(i * 7919) % o.agents < n_step, rng=random.Random(rng.random()))
              for i in range(spec.first, spec.last)]
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + o.register_timeout_seconds
    gate = asyncio.Semaphore(o.register_concurrency)
    tasks: list[asyncio.Task[None]] = []  # telemetry and steps: they end by themselves once the phase stops
    watches: list[asyncio.Task[None]] = []  # blocked reading their streams: cancelled at the end

    async def start(i: int, a: SimAgent) -> bool:
        async with gate:
            ok = await a.register(deadline)
        if ok:
            watches.append(asyncio.create_task(a.watch()))
            tasks.append(asyncio.create_task(a.telemetry(spec.workers[i % len(spec.workers)])))
            if a.stepping:
                tasks.append(asyncio.create_task(a.steps()))
        return ok

    lag = asyncio.create_task(loop_lag(stats.loop_lag))
    done = await asyncio.gather(*(start(i, a) for i, a in enumerate(agents)))
    conn.send(("registered", sum(done), stats.last_register))
    phase.start, phase.end = await loop.run_in_executor(None, conn.recv)
    await asyncio.sleep(max(0.0, phase.end - time.monotonic()))
    phase.stopping = True
    for a in agents:
        a.report_now.set()  # the telemetry loops wake, close their streams and read the acks
        a.finish()
    _, pending = await asyncio.wait(tasks, timeout=CLOSE_SECONDS) if tasks else (set(), set())
    for t in (*pending, *watches):
        t.cancel()
    await asyncio.gather(*tasks, *watches, return_exceptions=True)
    lag.cancel()
    for c in channels:
        await c.close(grace=None)
    return stats


LAG_TICK_SECONDS = 0.1


async def loop_lag(out: list[tuple[float, float]]) -> None:
    """How late a ``LAG_TICK_SECONDS`` sleep wakes up, again and again: an event loop too busy to keep
    its agents' timers shows here (and its step-to-push and health figures would include it)."""
    while True:
        t0 = time.monotonic()
        await asyncio.sleep(LAG_TICK_SECONDS)
        out.append((t0, max(0.0, time.monotonic() - t0 - LAG_TICK_SECONDS)))
