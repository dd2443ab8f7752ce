"""What liveness costs the planner (issue 10): CPU of a real ``edgesplit planner serve`` holding N idle
client connections, by how the clients watch them.

    python -m runtime.measure.keepalive_cost --connections 1000 --seconds 15

Modes, each over the same N connections (one TCP connection per simulated agent, as real agents have):

* ``server pings only``: the clients send no keep-alive ping (the planner still pings each client every
  ``keepalive_time_ms``, as it does by default);
* ``control keep-alive``: the clients' planner channels as the runtime opens them
  (``TransportOptions.control_channel``: a ping every 1 s, 0.8 s timeout): how agents and workers
  notice a silent partition to the planner;
* ``+ Health/Check 1 Hz``: the same plus one application-level probe RPC per connection per second,
  the alternative this module exists to price.

``--target worker`` prices the idle agent -> worker probes instead: N real frame streams
(``runtime.wire.stream.EdgeStream``, idle) to a real ``edgesplit worker`` subprocess, with the liveness
watchdog's idle probes on (the default) and off; the streams share one connection (one process).

The planner (or worker) runs pinned to one core and the clients to another where there are two; the planner's CPU
is read from /proc (utime + stime) over the measured window, minus nothing: an idle planner's own
figure is printed first. Figures are for this machine at the time (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import Sequence

import grpc

from runtime.measure.fleet.planner_proc import PlannerProcess, cpu_seconds
from runtime.wire.security import aio_channel
from runtime.wire.stream import time_health_check
from runtime.wire.transport import TransportOptions

MODES = ("server pings only", "control keep-alive", "+ Health/Check 1 Hz")


def _options(mode: str) -> list[tuple[str, int]]:
    t = TransportOptions()
    if mode == MODES[0]:
        options = [(k, v) for k, v in t.channel_options(control=True) if not k.startswith(("grpc.keepalive", "grpc.http2"))]
    else:
        options = list(t.channel_options(control=True))
    return [*options, ("grpc.use_local_subchannel_pool", 1)]  # one connection each, as separate agents have


async def _probe_loop(channel: grpc.aio.Channel, stop: asyncio.Event, counter: list[int]) -> None:
    await asyncio.sleep(hash(channel) % 1000 / 1000)  # spread over the second
    while not stop.is_set():
        t0 = time.monotonic()
        with contextlib.suppress(Exception):
            await time_health_check(channel, 1.0)
            counter[0] += 1
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))


async def _measure(planner: PlannerProcess, mode: str, connections: int, seconds: float) -> dict[str, float]:
    t = TransportOptions()
    channels = [aio_channel(planner.address, _options(mode), t.security) for _ in range(connections)]
    try:
        for i in range(0, connections, 200):  # connect in batches
            await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 30.0) for c in channels[i:i + 200]))
        stop, counter = asyncio.Event(), [0]
        probes = ([asyncio.create_task(_probe_loop(c, stop, counter)) for c in channels]
                  if mode == MODES[2] else [])
        await asyncio.sleep(3.0)  # settle
        cpu0, t0, n0 = cpu_seconds(planner.pid), time.monotonic(), counter[0]
        await asyncio.sleep(seconds)
        cpu1, t1, n1 = cpu_seconds(planner.pid), time.monotonic(), counter[0]
        stop.set()
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        return {"cores": (cpu1 - cpu0) / (t1 - t0), "rpc_per_s": (n1 - n0) / (t1 - t0)}
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


async def _idle_streams(address: str, streams: int, seconds: float, pid: int, probes: bool) -> float:
    """Worker cores while ``streams`` EdgeStreams stay open and idle (their watchdog probing or not)."""
    import dataclasses

    from prometheus_client import CollectorRegistry, Counter, Gauge

    from runtime.wire.liveness import LivenessOptions
    from runtime.wire.stream import EdgeStream

    r = CollectorRegistry()
    metrics = type("M", (), {"stream_up": Gauge("up", "", registry=r), "reconnects": Counter("opens", "", registry=r)})()
    t = dataclasses.replace(TransportOptions(), liveness=LivenessOptions(idle_probes=probes))
    opened = [EdgeStream(address, t, metrics, connect_timeout=10.0, reconnect=0.5) for _ in range(streams)]
    try:
        for s in opened:
            await s._ensure_open()  # open without a frame: an idle stream
        await asyncio.sleep(3.0)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(seconds)
        return (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    finally:
        await asyncio.gather(*(s.close() for s in opened), return_exceptions=True)


async def run_worker(streams: int, seconds: float) -> None:
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    folder = tempfile.mkdtemp(prefix="edgesplit-keepalive-")
    port_file = Path(folder, "port")
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli.main", "--log-level", "WARNING", "worker", "--listen",
                             "127.0.0.1:0", "--port-file", str(port_file), "--torch-threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker did not start")
            await asyncio.sleep(0.1)
        address = f"127.0.0.1:{int(port_file.read_text().strip())}"
        print(f"worker {address}, {_pin(proc.pid)}; load average {os.getloadavg()}")
        await asyncio.sleep(2.0)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        await asyncio.sleep(seconds)
        print(f"no streams: worker {(cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0):.4f} cores")
        print(f"| {streams} idle frame streams | worker cores |")
        print("|---|---|")
        for probes in (False, True):
            cores = await _idle_streams(address, streams, seconds, proc.pid, probes)
            print(f"| idle probes {'on (default)' if probes else 'off'} | {cores:.4f} |", flush=True)
        print(f"load average {os.getloadavg()}")
    finally:
        proc.terminate()
        proc.wait(10)


def _pin(planner_pid: int) -> str:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return "not pinned (one core)"
    os.sched_setaffinity(planner_pid, {cores[0]})
    os.sched_setaffinity(0, set(cores[1:]))
    return f"server on core {cores[0]}, clients on {cores[1:]}"


async def run(connections: int, seconds: float) -> None:
    planner = PlannerProcess()
    planner.start()
    try:
        pinned = _pin(planner.pid)
        print(f"planner {planner.address}, {pinned}; load average {os.getloadavg()}")
        await asyncio.sleep(2.0)
        c0, t0 = cpu_seconds(planner.pid), time.monotonic()
        await asyncio.sleep(seconds)
        idle = (cpu_seconds(planner.pid) - c0) / (time.monotonic() - t0)
        print(f"no connections: planner {idle:.4f} cores")
        print(f"| clients ({connections} connections) | planner cores | minus idle, per connection | RPC/s |")
        print("|---|---|---|---|")
        for mode in MODES:
            r = await _measure(planner, mode, connections, seconds)
            per = (r["cores"] - idle) / connections * 1e6
            print(f"| {mode} | {r['cores']:.4f} | {per:.1f} us/s | {r['rpc_per_s']:.0f} |", flush=True)
            await asyncio.sleep(2.0)
        print(f"load average {os.getloadavg()}")
    finally:
        planner.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="idle client connections (default 1000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per mode (default 15)")
    parser.add_argument("--target", choices=("planner", "worker"), default="planner",
                        help="planner: N client connections by keep-alive mode; worker: N idle frame streams, "
                             "idle probes on and off (default planner)")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 20_000 or not 1 <= args.seconds <= 300:
        parser.error("--connections must be within 1..20000 and --seconds within 1..300")
    asyncio.run(run(args.connections, args.seconds) if args.target == "planner"
                else run_worker(args.connections, args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
