"""Replay issue 10's abuse cases against real daemons on loopback and print what happened (SECURITY.md).

    python -m runtime.tools.abuse_check

Each line: the abuse, the status the daemon answered, and the figure that shows the bound (held
bytes, resident memory, health latency meanwhile, time to end a stalled stream, calls that reached a
handler, streams ended or refused past the InferStream caps: runtime.tools.abuse_streams). Needs no
root; takes ~60 s; the planner runs as a child process; the certificates are made here (runtime.tools.pki).
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.contracts.profile import Block, Profile
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.proto.edgesplit.v1 import tensor_pb2

if TYPE_CHECKING:
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import WorkerServer

RPC = 30.0


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _profile(role: str, blocks: int) -> str:
    bl = tuple(Block(index=i, name=f"b{i}", seconds=0.001, output_bytes=1000, first_layer=i, last_layer=i)
               for i in range(blocks))
    return Profile(machine="m", role=role, model="tinynet", blocks=bl, input_bytes=1000).to_json()


async def _code(coro: Awaitable[object]) -> str:
    try:
        await coro
        return "OK"
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name}: {(e.details() or '')[:70]}"


async def _start_planner(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``edgesplit planner serve`` as a child process (the runtime never imports the planner); its port."""
    port_file = tmp / "port"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli.main", "--log-level", "ERROR", "planner", "serve",
                             "--listen", "127.0.0.1:0", "--db", str(tmp / "p.sqlite"), "--port-file", str(port_file)],
                            stdout=subprocess.DEVNULL)
    for _ in range(600):  # up to 60 s
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError("the planner did not start within 60 s")


async def profiles(tmp: Path) -> None:
    proc, port = await _start_planner(tmp)
    good = _profile("device", 21)
    deep = good.replace('"settings": {}', '"settings": ' + "[" * 10_000 + "]" * 10_000)
    cases = {
        "integer 10^400 as input_bytes": json.dumps({**json.loads(good), "input_bytes": 0}).replace(
            '"input_bytes": 0', '"input_bytes": 1' + "0" * 400),
        "JSON nested 10,000 deep": deep,
        "NaN p95_seconds": good.replace('"seconds": 0.001', '"seconds": 0.001, "p95_seconds": NaN', 1),
        "4,097 blocks (limit 4,096)": _profile("device", 4097),
    }
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = ppb_grpc.PlannerStub(ch)  # type: ignore[no-untyped-call]  # generated, unannotated
        health = health_pb2_grpc.HealthStub(ch)
        for name, text in cases.items():
            req = ppb.RegisterAgentRequest(agent_id="x", model_id="tinynet", profile_json=text)
            print(f"profile: {name:<32} -> {await _code(stub.RegisterAgent(req, timeout=RPC))}")
        stored = len((await stub.ListAgents(ppb.ListAgentsRequest(), timeout=RPC)).agents)
        big = ppb.RegisterWorkerRequest(worker_id="w", address="127.0.0.1:1", tier="edge",
                                        profiles_json=[_profile("edge", 4096)])
        task = asyncio.ensure_future(stub.RegisterWorker(big, timeout=RPC))
        lat = []
        while not task.done():
            t0 = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=RPC)
            lat.append(time.perf_counter() - t0)
        await task
        print(f"profile: agents registered after the abuses: {stored}; health during a 4,096-block registration: "
              f"{len(lat)} checks, p50 {statistics.median(lat) * 1e3:.1f} ms, max {max(lat) * 1e3:.1f} ms")
        await _hijack(stub)
    proc.terminate()
    proc.wait(10)


async def _hijack(stub: ppb_grpc.PlannerStub) -> None:
    """Re-register a worker id and report plan status for an agent, as another process (another lease)."""
    owner, stranger = (("edgesplit-lease", "o" * 43),), (("edgesplit-lease", "s" * 43),)
    worker = ppb.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:50051", tier="edge",
                                       profiles_json=[_profile("edge", 21)])
    agent = ppb.RegisterAgentRequest(agent_id="a1", model_id="tinynet", profile_json=_profile("device", 21))
    setup = [await _code(stub.RegisterWorker(worker, timeout=RPC, metadata=owner)),
             await _code(stub.RegisterAgent(agent, timeout=RPC, metadata=owner))]
    worker.address = "127.0.0.1:6666"
    hijack = [await _code(stub.RegisterWorker(worker, timeout=RPC, metadata=md)) for md in (stranger, None)]
    spoof = await _code(stub.ReportPlanStatus(ppb.PlanStatus(agent_id="a1", version=1, applied=False,
                                                             message="spoofed"), timeout=RPC, metadata=stranger))
    listed = {a.agent_id: f"v{a.plan.version} on {a.plan.worker_address or 'the board'}"
              for a in (await stub.ListAgents(ppb.ListAgentsRequest(), timeout=RPC)).agents}
    print(f"planner: owner registers w1 and a1 -> {setup}; w1 re-registered at another address by another lease / "
          f"none -> {hijack}; a1's plan status refused by another lease -> {spoof}; a1's plan afterwards: "
          f"{listed.get('a1', '(none)')}")


async def _never_reads(stub: pb_grpc.InferenceStub, ws: WorkerServer, cfg: WorkerConfig) -> None:
    """A client that writes frames and never reads a result: bounded, then its stream is ended."""
    call = stub.InferStream(timeout=RPC)
    bad = pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(agent_id="x"),
                                                 tensor=tensor_pb2.Tensor(buffer=bytes(4096))))
    written = 0
    for _ in range(50_000):  # until flow control holds a write (cancelling it would cancel the call)
        write = asyncio.ensure_future(call.write(bad))
        if not (await asyncio.wait({write}, timeout=2.0))[0]:
            break
        written += 1
    held, t0 = ws.service.unsent_results, time.monotonic()
    while not ws.service.metrics.stalled_streams._value.get() and time.monotonic() - t0 < cfg.stalled_stream_seconds + 10:
        await asyncio.sleep(0.05)
    ended = time.monotonic() - t0
    code, n = "", 0
    try:
        while await asyncio.wait_for(call.read(), RPC) is not grpc.aio.EOF:
            n += 1
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    print(f"worker: a client that never reads: its writes stalled after {written} frames with {held} unsent results "
          f"held (cap {cfg.max_stream_results}); the stream was ended {ended:.1f} s later (--stalled-stream-seconds "
          f"{cfg.stalled_stream_seconds:g}), the worker then held {ws.service.unsent_results} results and "
          f"{int(ws.service.metrics.streams._value.get())} open streams; reading again: {n} results, then {code}")


async def _prepare_all(stub: pb_grpc.InferenceStub, ws: WorkerServer, cfg: WorkerConfig, label: str) -> None:
    codes = []
    for model in ("digits_cnn", "resnet18", "mobilenet_v2", "efficientnet_lite0", "vgg16", "densenet169"):
        hdr = pb.FrameHeader(model_id=model, split_id="output")
        codes.append((await _code(stub.Prepare(pb.PrepareRequest(header=hdr), timeout=120.0))).split(":")[0])
    print(f"worker ({label}): Prepare of the 6 bundled models -> {codes}; loaded "
          f"{sorted(ws.service.tails._models)} (cap {cfg.max_loaded_models})")


async def worker() -> None:
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, stalled_stream_seconds=5.0))
    cfg = ws.service.config
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}", options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stub = pb_grpc.InferenceStub(ch)  # type: ignore[no-untyped-call]  # generated, unannotated
        before = rss_mb()
        calls = [stub.InferStream(timeout=RPC) for _ in range(40)]
        piece = bytes(4 * 2**20)
        for i, call in enumerate(calls):  # 40 streams x a 32 MiB frame left incomplete after 8 MiB
            await call.write(pb.StreamRequest(frame=pb.InferRequest(
                header=pb.FrameHeader(agent_id="x", seq=i, model_id="resnet18", split_id="add_2"),
                tensor=tensor_pb2.Tensor(buffer=piece, payload_size=32 * 2**20, chunks=8))))
            await call.write(pb.StreamRequest(chunk=pb.FrameChunk(seq=i, index=1, data=piece)))
        await asyncio.sleep(1.0)
        print(f"worker: 40 streams each holding an incomplete frame: held {ws.service.reassembly.held / 2**20:.0f} MiB "
              f"(cap {cfg.max_reassembly_bytes / 2**20:.0f} MiB), max RSS +{rss_mb() - before:.0f} MB")
        for call in calls:
            call.cancel()
        await _never_reads(stub, ws, cfg)
        x = tensor_pb2.Tensor(shape=[64, 128, 28, 28], dtype="float32")
        req = pb.InferRequest(header=pb.FrameHeader(agent_id="x", model_id="resnet18", split_id="add_2"), tensor=x)
        print(f"worker: batch 64 -> {await _code(stub.Infer(req, timeout=RPC))}")
        await _prepare_all(stub, ws, cfg, "names no model: every bundled one allowed")
    await ws.drain_and_stop(0.5)
    ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, preload=("digits_cnn",)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)  # type: ignore[no-untyped-call]  # generated, unannotated
        await _prepare_all(stub, ws, ws.service.config, "--preload digits_cnn")
    await ws.drain_and_stop(0.5)


def main() -> None:
    from runtime.tools.abuse_streams import streams
    from runtime.tools.abuse_tls import tls

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(profiles(Path(tmp)))
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(tls(Path(tmp)))
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(streams(Path(tmp)))
    asyncio.run(worker())


if __name__ == "__main__":
    main()
