"""One fleet run: the planner subprocess, workers, loader processes, health checks, samples.

Timeline: start the planner (loopback, temporary store) and wait for health SERVING; register the
workers (again every ``worker_reregister_seconds``); start the loader processes, which register
their agents at once and keep them reporting; once every loader has registered, ``settle_seconds``
pass, then the measured phase (``duration_seconds``: bandwidth steps, step-to-push) runs; the
loaders close their streams (reading the acks) and send their counts. Health is checked every
``health_interval_seconds`` throughout; the planner's CPU and RSS are sampled every 0.5 s. The
planner is stopped and its folder removed at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import resource
import secrets
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

import grpc

from runtime.contracts.errors import EdgesplitError, Unavailable
from runtime.measure.fleet import loader, report
from runtime.measure.fleet.agent import LEASE_KEY
from runtime.measure.fleet.options import FleetOptions
from runtime.measure.fleet.planner_proc import cores, pin
from runtime.measure.fleet.profiles import Fleet, fleet
from runtime.measure.fleet.replicas import Replicas, gc_pauses
from runtime.measure.fleet.stats import Stats
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.wire.stream import time_health_check

HEALTH_TIMEOUT_SECONDS = 5.0  # a health check slower than this counts as failed
SAMPLE_SECONDS = 0.5  # the planner's CPU and RSS are read this often
Progress = Callable[[str], None]
Leases = dict[str, tuple[tuple[str, str], ...]]  # worker id -> its registration metadata (its lease)


def _split_cores(pinning: bool) -> tuple[list[int], list[int]]:
    """(planner's cores, loaders' cores); both empty when pinning is off or there is one core."""
    cpus = cores()
    if not pinning or len(cpus) < 2:
        return [], []
    return cpus[:1], cpus[1:]


def run(options: FleetOptions, progress: Progress = print) -> dict[str, Any]:
    """Run once; returns the results (report.summarize's dict)."""
    boards = fleet(options.board_types)
    planner_cpus, loader_cpus = _split_cores(options.pin)
    fleet_planners = Replicas(options)
    load_before = os.getloadavg()
    procs: list[BaseProcess] = []
    pinned, folder = False, ""
    try:
        addresses = fleet_planners.start()
        planner = fleet_planners.survivor
        folder = planner.folder
        pinned = bool(planner_cpus) and all(pin(p.pid, planner_cpus) for p in fleet_planners.planners) \
            and pin(0, loader_cpus)
        if pinned:
            fleet_planners.pin_store(planner_cpus)  # PostgreSQL beside the planners, off the loaders' core
        progress(f"planner pid {', '.join(str(p.pid) for p in fleet_planners.planners)} on {', '.join(addresses)}"
                 + (f" ({fleet_planners.store.split('?')[0]})" if fleet_planners.store else "")
                 + (f", pinned to cpu {planner_cpus}{' with PostgreSQL' if fleet_planners.store_pinned else ''}, "
                    f"loaders to {loader_cpus}" if pinned else ", not pinned"))
        raw = asyncio.run(_drive(options, fleet_planners, boards, tuple(loader_cpus if pinned else ()), procs, progress))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        exit_code, tail = fleet_planners.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    raw.update(driver_cpu_seconds=usage.ru_utime + usage.ru_stime, planner_pid=planner.pid, planner_folder=folder,
               pinned=pinned, planner_cpus=planner_cpus, loader_cpus=loader_cpus if pinned else [],
               load_before=load_before, load_after=os.getloadavg(), planner_exit=exit_code, planner_log_tail=tail,
               killed_at=fleet_planners.killed_at, store_cpu_seconds=fleet_planners.store_cpu_seconds,
               store_pinned=fleet_planners.store_pinned, gc=gc_pauses(fleet_planners.survivor),
               replica_samples=[[s.__dict__ for s in p.samples] for p in fleet_planners.planners])
    return report.summarize(options, raw)


async def _drive(options: FleetOptions, planners: Replicas, boards: Fleet, cpus: tuple[int, ...],
                 procs: list[BaseProcess], progress: Progress) -> dict[str, Any]:
    planner = planners.survivor
    health_channels = [loader.channel(p.address, -1 - k) for k, p in enumerate(planners.planners)]
    try:
        for ch in health_channels:
            await _wait_serving(ch)
        stubs = [ppb_grpc.PlannerStub(ch) for ch in health_channels]  # type: ignore[no-untyped-call]  # generated, unannotated
        workers = tuple(f"fleet-worker-{k}" for k in range(options.workers))
        leases: Leases = {w: ((LEASE_KEY, secrets.token_urlsafe(24)),) for w in workers}
        for stub in stubs:  # every replica hears them at once (the others would read them from the store)
            await _register_workers(stub, workers, leases, boards, options)
        baseline = planner.sample()
        health: list[tuple[float, float]] = []  # (monotonic, seconds); -1 = failed
        health_errors: Counter[str] = Counter()
        driver_lag: list[tuple[float, float]] = []
        stop = asyncio.Event()  # the loops end at their next turn even when a gRPC call ate their cancellation
        stop_first = asyncio.Event()  # the first replica's health checks (it may be killed)
        background = [*(asyncio.create_task(_health_loop(ch, options, health, health_errors, stop,
                                                         stop_first if k == 0 and options.kill_after_seconds else None))
                        for k, ch in enumerate(health_channels)),
                      asyncio.create_task(loader.loop_lag(driver_lag)),
                      asyncio.create_task(_sample_loop(planners)),
                      asyncio.create_task(_workers_loop(stubs, workers, leases, boards, options, stop))]
        try:
            raw = await _load(options, planners, boards, workers, cpus, procs, progress, stop_first, background)
            for p in planners.alive():
                p.sample()  # one at or after the measured phase's end
        finally:
            stop.set()
            for t in background:
                t.cancel()
            await asyncio.wait(background, timeout=5.0)  # bounded: Ctrl-C must not wait on a loop
        raw.update(health=health, health_errors=dict(health_errors), baseline=baseline.__dict__, driver_lag=driver_lag,
                   samples=[s.__dict__ for s in planner.samples])
        return raw
    finally:
        for ch in health_channels:
            await ch.close(grace=None)


async def _load(options: FleetOptions, planners: Replicas, boards: Fleet, workers: tuple[str, ...],
                cpus: tuple[int, ...], procs: list[BaseProcess], progress: Progress,
                stop_first: asyncio.Event, background: list[asyncio.Task[None]]) -> dict[str, Any]:
    n, k = options.agents, options.loader_count
    ctx = multiprocessing.get_context("spawn")
    pipes = []
    addresses = tuple(p.address for p in planners.planners)
    for i in range(k):
        first, last = i * n // k, (i + 1) * n // k
        spec = loader.LoaderSpec(i, first, last, addresses, options, boards.boards, boards.model, boards.digest,
                                 workers, cpus)
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=loader.main, args=(spec, theirs), name=f"fleet-loader-{i}", daemon=True)
        p.start()
        theirs.close()
        procs.append(p)
        pipes.append(ours)
    t_spawn = time.monotonic()
    progress(f"{k} loader process(es), {options.channels} channels each: registering {n} agents")
    registered = await asyncio.gather(*(_recv(c, p, options.register_timeout_seconds + 60) for c, p in zip(pipes, procs, strict=True)))
    t_registered = time.monotonic()
    count = sum(r[1] for r in registered)
    progress(f"{count}/{n} agents registered in {t_registered - t_spawn:.1f} s (since the loaders started)")
    start = time.monotonic() + options.settle_seconds
    end = start + options.duration_seconds
    for c in pipes:
        c.send((start, end))
    progress(f"measured phase: {options.duration_seconds:g} s after {options.settle_seconds:g} s settling"
             + (f"; replica 0 is SIGKILLed {options.kill_after_seconds:g} s into it" if options.kill_after_seconds else ""))
    if options.kill_after_seconds:
        background.append(asyncio.create_task(planners.kill_later(start + options.kill_after_seconds, stop_first)))
    results = await asyncio.gather(*(_recv(c, p, options.settle_seconds + options.duration_seconds + 90)
                                     for c, p in zip(pipes, procs, strict=True)))
    stats = Stats.merge([r[1] for r in results])
    return dict(stats=stats, t_spawn=t_spawn, t_registered=t_registered, measure_start=start, measure_end=end)


async def _recv(conn: Any, proc: BaseProcess, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not conn.poll():
        if not proc.is_alive():
            raise Unavailable(f"loader {proc.name} exited ({proc.exitcode}) without reporting")
        if time.monotonic() > deadline:
            raise Unavailable(f"loader {proc.name} did not report within {timeout:.0f} s")
        await asyncio.sleep(0.05)
    return conn.recv()


async def _wait_serving(channel: grpc.aio.Channel, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await time_health_check(channel, 1.0)
            return
        except EdgesplitError:
            if time.monotonic() > deadline:
                raise Unavailable(f"the planner did not answer health checks within {timeout:g} s") from None
            await asyncio.sleep(0.1)


async def _register_workers(stub: ppb_grpc.PlannerStub, workers: tuple[str, ...], leases: Leases, boards: Fleet,
                            options: FleetOptions) -> None:
    for k, w in enumerate(workers):
        request = ppb.RegisterWorkerRequest(worker_id=w, address=f"127.0.0.1:{20000 + k}", tier="edge",
                                            profiles_json=[boards.edge])
        await stub.RegisterWorker(request, timeout=options.rpc_timeout_seconds * 3, metadata=leases[w])


async def _workers_loop(stubs: list[ppb_grpc.PlannerStub], workers: tuple[str, ...], leases: Leases, boards: Fleet,
                        options: FleetOptions, stop: asyncio.Event) -> None:
    """Workers register again every ``worker_reregister_seconds``, as real workers do (errors only
    logged: a killed replica's refusals too)."""
    while not stop.is_set():
        await asyncio.sleep(options.worker_reregister_seconds)
        for stub in stubs:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await _register_workers(stub, workers, leases, boards, options)


async def _health_loop(channel: grpc.aio.Channel, options: FleetOptions, out: list[tuple[float, float]], errors: Counter[str],
                       stop: asyncio.Event, stop_this: asyncio.Event | None = None) -> None:
    while not stop.is_set() and not (stop_this is not None and stop_this.is_set()):
        t0 = time.monotonic()
        try:
            out.append((t0, await time_health_check(channel, HEALTH_TIMEOUT_SECONDS)))
        except EdgesplitError as e:
            if stop_this is not None and stop_this.is_set():
                return  # killed while this check was under way: not a health figure of a live planner
            out.append((t0, -1.0))
            errors[e.code.name] += 1
        await asyncio.sleep(max(0.0, options.health_interval_seconds - (time.monotonic() - t0)))


async def _sample_loop(planners: Replicas) -> None:
    while True:
        for p in planners.alive():
            p.sample()
        await asyncio.sleep(SAMPLE_SECONDS)
