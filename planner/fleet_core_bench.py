"""A microbenchmark of the planner's per-agent hot path (issue 15): registrations per second and
planner CPU per telemetry message, with N simulated agents of a few board types over real gRPC.

The planner runs as its own process (``edgesplit planner serve`` on 127.0.0.1:0), so its CPU time
(``/proc/PID/stat``) is the planner's alone; this process is the load (asyncio clients). Profiles
are synthetic but shaped like an EfficientNet-Lite0 profile (``--blocks`` blocks, four codecs per
cut); each board type differs in its block times (so its profile has its own content hash).

    python -m planner.fleet_core_bench --agents 1000 --board-types 10 --reports 5

Prints one line per phase; the figures are what planner/results/fleet_core.md records.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from runtime.contracts.profile import Block, Profile, Transfer
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as pb_grpc

MODEL = "effnet-like"
CODECS = (("fp32+lz4", 1.0, 0.002), ("fp16+lz4", 0.5, 0.0015), ("int8+lz4", 0.25, 0.001), ("raw", 1.2, 0.0))
RPC = 30.0


def make_profile(machine: str, role: str, blocks: int, scale: float) -> str:
    """A profile of ``blocks`` blocks, each with four transfers; block times times ``scale``."""
    rng = random.Random(blocks)
    out = []
    size = 602_112
    for i in range(blocks):
        size = max(4_000, int(size * rng.uniform(0.8, 1.1)))
        transfers = tuple(Transfer(name, int(size * ratio), enc * scale, enc, codec=name.split("+")[0])
                          for name, ratio, enc in CODECS)
        out.append(Block(i, f"b{i}", rng.uniform(0.0005, 0.004) * scale, size, first_layer=i, last_layer=i,
                         param_bytes=100_000, transfers=transfers))
    return Profile(machine, role, MODEL, tuple(out), 602_112, model_digest="w1",
                   settings={"runs": 20, "note": "synthetic, fleet_core_bench"}).to_json()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --gc-pauses: the planner process times each collection of the oldest generation and prints them at exit
GC_PRELUDE = """import atexit, gc, runpy, sys, time
pauses, t = [], [0.0]
def cb(phase, info):
    if info["generation"] == 2:
        if phase == "start":
            t[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - t[0])
gc.callbacks.append(cb)
atexit.register(lambda: print("planner gen-2 collections in order (ms):", [round(p * 1e3, 1) for p in pauses],
                              "frozen objects:", gc.get_freeze_count(), file=sys.stderr, flush=True))
sys.argv = ["edgesplit"] + sys.argv[1:]
runpy.run_module("runtime.cli.main", run_name="__main__")
"""


def start_planner(folder: str, extra: list[str], cprofile: str = "", gc_pauses: bool = False) -> tuple[subprocess.Popen, int]:
    port_file = Path(folder) / "port"
    prof = ["-m", "cProfile", "-o", cprofile] if cprofile else []
    entry = ["-c", GC_PRELUDE] if gc_pauses else ["-m", "runtime.cli.main"]
    cmd = [sys.executable, *prof, *entry, "--log-level", "WARNING", "planner", "serve", "--listen", "127.0.0.1:0",
           "--db", str(Path(folder) / "p.sqlite"), "--port-file", str(port_file), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"planner did not start: {cmd}")
        time.sleep(0.1)
    return proc, int(port_file.read_text())


def lease(i: int) -> tuple[tuple[str, str]]:
    return (("edgesplit-lease", f"bench-agent-{i}"),)


async def register(stub, n: int, boards: list[str], concurrency: int) -> list[float]:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            await stub.RegisterAgent(pb.RegisterAgentRequest(agent_id=f"a{i}", model_id=MODEL, model_digest="w1",
                                                             profile_json=boards[i % len(boards)]),
                                     timeout=RPC, metadata=lease(i))
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(i) for i in range(n)))
    return lat


async def telemetry(stub, n: int, reports: int, step_share: float, concurrency: int,
                    interval: float = 0.0) -> tuple[int, int, dict]:
    """``reports`` messages per agent on one client stream each (``concurrency`` streams at a time;
    ``interval`` > 0: every agent's stream open at once, one report per ``interval`` seconds, from a
    random phase); ~``step_share`` of them move the link far (out of any band), the rest jitter
    +-3 % around the agent's base."""
    concurrency = n if interval > 0 else concurrency
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(7)
    codes: dict[str, int] = {}
    details: dict[str, str] = {}  # the first message of each error code
    sent = 0

    async def one(i: int) -> None:
        nonlocal sent
        base = 5e6 * (1 + (i % 7) / 10)

        async def messages():
            nonlocal sent
            if interval > 0:
                await asyncio.sleep(rng.uniform(0, interval))
            for k in range(reports):
                if interval > 0 and k:
                    await asyncio.sleep(interval)
                bw = base * (0.1 if rng.random() < step_share else rng.uniform(0.97, 1.03))
                sent += 1
                yield pb.Telemetry(agent_id=f"a{i}", worker=f"w{i % 3}", bandwidth_bytes_per_second=bw,
                                   rtt_seconds=0.005, sent_unix=time.time(), bandwidth_samples=5)

        async with sem:
            try:
                await stub.ReportTelemetry(messages(), timeout=RPC, metadata=lease(i))
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
                details.setdefault(e.code().name, (e.details() or "")[:160])

    await asyncio.gather(*(one(i) for i in range(n)))
    for code, text in details.items():
        print(f"  {code}: {text}", flush=True)
    return sent, n, codes


async def health_ms(channel) -> float:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t0 = time.perf_counter()
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC)
    return (time.perf_counter() - t0) * 1e3


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def run(args: argparse.Namespace, port: int, pid: int) -> None:
    workers = make_profile("edge", "edge", args.blocks, 0.1)
    boards = [make_profile(f"board{k}", "device", args.blocks, 1.0 + k / 10) for k in range(args.board_types)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.PlannerStub(ch)
        for w in range(3):
            await stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id=f"w{w}", address=f"10.0.0.{w + 1}:50051",
                                                               tier="edge", profiles_json=[workers]),
                                      timeout=RPC, metadata=(("edgesplit-lease", f"bench-worker-{w}"),))
        print(f"profile: {len(boards[0]) / 1e3:.0f} kB JSON, {args.blocks} blocks x {len(CODECS)} transfers; "
              f"{args.board_types} board types, 3 workers", flush=True)
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        lat = await register(stub, args.agents, boards, args.concurrency)
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
        print(f"register {args.agents} agents: {wall:.1f} s, {args.agents / wall:.0f}/s, planner CPU {cpu:.1f} s "
              f"({cpu / args.agents * 1e3:.2f} ms/agent), RPC p50 {pct(lat, .5) * 1e3:.0f} ms p99 "
              f"{pct(lat, .99) * 1e3:.0f} ms; RSS {rss_mb(pid):.0f} MB", flush=True)
        await asyncio.sleep(1.0)
        for phase in range(args.phases):  # the first carries each agent's first measured link
            c0, t0 = cpu_seconds(pid), time.perf_counter()
            sent, streams, codes = await telemetry(stub, args.agents, args.reports, args.step_share, args.concurrency,
                                                   args.interval)
            wall = time.perf_counter() - t0
            await asyncio.sleep(args.settle)  # what the planner still does after the acks (queued decisions)
            cpu = cpu_seconds(pid) - c0
            print(f"telemetry phase {phase + 1}: {sent} reports on {streams} streams: {wall:.1f} s, {sent / wall:.0f}/s "
                  f"sent, planner CPU {cpu:.1f} s incl. {args.settle:.0f} s settle ({cpu / sent * 1e3:.3f} ms/report); "
                  f"streams {codes}", flush=True)
        c0 = cpu_seconds(pid)
        rereg = []
        for _ in range(3):
            t1 = time.perf_counter()
            await stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id="w0", address="10.0.0.1:50051", tier="edge",
                                                               profiles_json=[workers]),
                                      timeout=RPC, metadata=(("edgesplit-lease", "bench-worker-0"),))
            rereg.append(time.perf_counter() - t1)
        await asyncio.sleep(args.settle)
        cpu = cpu_seconds(pid) - c0
        hs = [await health_ms(ch) for _ in range(5)]
        print(f"unchanged worker re-registration x3: RPC {', '.join(f'{x * 1e3:.0f}' for x in rereg)} ms; planner "
              f"CPU {cpu:.2f} s incl. {args.settle:.0f} s settle; health {', '.join(f'{h:.1f}' for h in hs)} ms; "
              f"RSS {rss_mb(pid):.0f} MB", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--board-types", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=64, help="blocks per profile (EfficientNet-Lite0-sized)")
    ap.add_argument("--reports", type=int, default=5, help="telemetry messages per agent")
    ap.add_argument("--interval", type=float, default=0.0,
                    help="seconds between one agent's reports (0: as fast as the planner reads them)")
    ap.add_argument("--phases", type=int, default=1, help="telemetry phases, one after the other")
    ap.add_argument("--step-share", type=float, default=0.1, help="share of reports that move the link out of band")
    ap.add_argument("--concurrency", type=int, default=64, help="calls in flight at once")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait after each phase before reading CPU")
    ap.add_argument("--cprofile", default="", help="write the planner's event-loop thread profile (cProfile) here")
    ap.add_argument("--gc-pauses", action="store_true", help="print the planner's gen-2 GC pauses when it exits")
    ap.add_argument("planner_args", nargs="*", help="extra 'planner serve' flags (after --)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        proc, port = start_planner(folder, ["--max-ids-per-identity", "4", *args.planner_args], args.cprofile,
                                    args.gc_pauses)
        try:
            print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
            asyncio.run(run(args, port, proc.pid))
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
