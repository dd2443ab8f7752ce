"""Per-frame cost of transport security on loopback: plain, TLS + token, and mTLS.

Echo (default): a Daemon (the scaffold every endpoint uses, with its auth interceptor) serves an
echo ``InferStream``: each frame of ``--payload`` bytes comes back as a small result, one frame in
flight, over one long-lived stream, as the agent sends them.

Pipeline (``--pipeline``): the full path, one real worker process per mode (``edgesplit worker``
with that mode's certificates/tokens) and the real agent (runtime.agent.client.Agent) in this
process sending frames of ``--model`` cut at ``--split`` with ``--codec`` (default ResNet-18 at
layer4_1_relu_1, raw: 100,352-byte frames, the worker's tail is the pooling and the classifier).
Reported: the frame's ``total`` (head + encode + send until the result) and ``transfer_edge``
(send until the result: gRPC, TLS, the worker's decode and tail).

The modes run interleaved (echo: in ``--rounds`` rounds; pipeline: frame by frame) so machine
noise hits them alike.

    python -m runtime.tools.tls_bench --payload 100000 --frames 300 --rounds 5
    python -m runtime.tools.tls_bench --pipeline --frames 100 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from runtime.daemon.server import Daemon, DaemonOptions
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.tools import pki
from runtime.wire.security import SecurityOptions, token_digest
from runtime.wire.transport import TransportOptions


class Echo(pb_grpc.InferenceServicer):
    async def InferStream(self, request_iterator: AsyncIterator[pb.StreamRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.InferResult]:
        async for msg in request_iterator:
            yield pb.InferResult(header=pb.FrameHeader(seq=msg.frame.header.seq))


def make_modes(d: Path) -> dict[str, tuple[SecurityOptions, SecurityOptions]]:
    """mode -> (server, client) security."""
    ca = pki.make_ca()
    pki.write(ca, d, "ca")
    pki.write(pki.issue(ca, "worker", "bench", ("127.0.0.1",)), d, "server")
    pki.write(pki.issue(ca, "agent", "bench"), d, "client")
    token = "t" * 43
    (d / "token").write_text(token)
    (d / "tokens").write_text(f"agent bench {token_digest(token)}\n")
    ca_file, cert, key = str(d / "ca.pem"), str(d / "server.pem"), str(d / "server.key")
    return {
        "insecure": (SecurityOptions(), SecurityOptions()),
        "tls+token": (SecurityOptions(cert_file=cert, key_file=key, tokens_file=str(d / "tokens")),
                      SecurityOptions(ca_file=ca_file, token_file=str(d / "token"))),
        "mtls": (SecurityOptions(ca_file=ca_file, cert_file=cert, key_file=key),
                 SecurityOptions(ca_file=ca_file, cert_file=str(d / "client.pem"), key_file=str(d / "client.key"))),
    }


async def one_run(server: SecurityOptions, client: SecurityOptions, payload: int, frames: int) -> list[float]:
    daemon = Daemon(DaemonOptions(listen="127.0.0.1:0", transport=TransportOptions(security=server), reflection=False))
    await daemon.start(lambda s: pb_grpc.add_InferenceServicer_to_server(Echo(), s))  # type: ignore[no-untyped-call]  # generated, unannotated
    times: list[float] = []
    try:
        async with TransportOptions(security=client).aio_channel(f"127.0.0.1:{daemon.port}") as ch:
            call = pb_grpc.InferenceStub(ch).InferStream(timeout=120.0)  # type: ignore[no-untyped-call]  # generated, unannotated
            data = bytes(payload)
            for seq in range(frames + 10):  # the first 10 warm the connection up
                msg = pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(seq=seq),
                                                             tensor=tensor_pb2.Tensor(buffer=data, payload_size=payload)))
                t0 = time.perf_counter()
                await call.write(msg)
                await call.read()
                if seq >= 10:
                    times.append(time.perf_counter() - t0)
            await call.done_writing()
    finally:
        await daemon.drain(0.2)
    return times


async def bench(payload: int, frames: int, rounds: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        modes = make_modes(Path(tmp))
        out: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(rounds):
            for mode, (server, client) in modes.items():
                out[mode] += await one_run(server, client, payload, frames)
    return out


def _worker_flags(server: SecurityOptions) -> list[str]:
    flags = []
    for name in ("ca_file", "cert_file", "key_file", "tokens_file"):
        if getattr(server, name):
            flags += ["--" + name.replace("_", "-"), getattr(server, name)]
    return flags


def _spawn_worker(flags: list[str], d: Path, name: str, timeout: float = 120.0) -> tuple[subprocess.Popen[bytes], int]:
    """``edgesplit worker`` as a child; returns once it serves (it writes its port file then)."""
    port_file = d / f"{name}.port"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli.main", "worker", "--listen", "127.0.0.1:0",
                             "--port-file", str(port_file), "--torch-threads", "1", *flags],
                            stdout=subprocess.DEVNULL, stderr=open(d / f"{name}.log", "w"),  # noqa: SIM115 (the child's for its life)
                            env=os.environ.copy())
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text().endswith("\n")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker {name} did not start: {(d / f'{name}.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


async def pipeline(model: str, split: str, codec: str, frames: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """mode -> {"total": [...], "transfer_edge": [...]} seconds per frame, through real workers and agents."""
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.agent.sources import open_source
    from runtime.models.loader import load_model
    from runtime.wire.codec import get_codec

    torch.set_num_threads(1)
    loaded = load_model(model)
    inputs = [f.tensor for f in open_source(loaded.spec, "synthetic", 8)]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        modes = make_modes(d)
        workers: dict[str, subprocess.Popen[bytes]] = {}
        agents: dict[str, Any] = {}
        try:
            for mode, (server, client) in modes.items():
                workers[mode], port = _spawn_worker(_worker_flags(server), d, mode.replace("+", "_"))
                plan = InitialPlan(loaded.split(split), get_codec(codec, spec=loaded.spec), worker=f"127.0.0.1:{port}")
                # a token's agent may send frames only for its own id (47ce628): the tokens file's "bench"
                agents[mode] = Agent(loaded, plan, AgentOptions(deadline_seconds=30.0, agent_id="bench" if client.token_file else "",
                                                                transport=TransportOptions(security=client)))
                await agents[mode].start()
                for i in range(10):  # warm-up: the worker loads its tail, the connection settles
                    await agents[mode].infer(inputs[i % len(inputs)])
            out: dict[str, dict[str, list[float]]] = {m: {"total": [], "transfer_edge": []} for m in modes}
            for _ in range(rounds):
                for i in range(frames):  # frame by frame across modes: none idles, noise hits all alike
                    for mode, agent in agents.items():
                        r = await agent.infer(inputs[i % len(inputs)])
                        if r.where != "edge":
                            raise RuntimeError(f"{mode}: a frame ran locally ({r.fallback_reason}); figures void")
                        out[mode]["total"].append(r.times["total"])
                        out[mode]["transfer_edge"].append(r.times["transfer_edge"])
            return out
        finally:
            for agent in agents.values():
                await agent.close()
            for proc in workers.values():
                proc.terminate()
                proc.wait(30)


def _row(mode: str, t: list[float], base: float) -> str:
    t = sorted(t)
    p50, p95 = statistics.median(t), t[int(0.95 * (len(t) - 1))]
    return (f"{mode:<10} {p50 * 1e3:8.3f} {p95 * 1e3:8.3f} {statistics.fmean(t) * 1e3:8.3f} "
            f"{100 * (p50 / base - 1):+15.1f}% {(p50 - base) * 1e3:+10.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--payload", type=int, default=100_000, help="echo: bytes per frame (default: 100000)")
    p.add_argument("--frames", type=int, default=300, help="frames per mode per round (default: 300)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every mode (default: 5)")
    p.add_argument("--pipeline", action="store_true", help="real worker processes and the real agent (see above)")
    p.add_argument("--model", default="resnet18", help="pipeline: model (default: resnet18)")
    p.add_argument("--split", default="layer4_1_relu_1", help="pipeline: split (default: layer4_1_relu_1, 100,352 B raw)")
    p.add_argument("--codec", default="raw", help="pipeline: wire codec (default: raw)")
    a = p.parse_args()
    header = f"{'mode':<10} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8} {'p50 vs insecure':>16} {'p50 +ms':>10}"
    load = os.getloadavg()
    if a.pipeline:
        res = asyncio.run(pipeline(a.model, a.split, a.codec, a.frames, a.rounds))
        print(f"pipeline {a.model}@{a.split} codec {a.codec}, {a.frames} frames x {a.rounds} rounds per mode, "
              f"one frame in flight, loopback, load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        for stage in ("total", "transfer_edge"):
            base = statistics.median(res["insecure"][stage])
            print(f"-- {stage}\n{header}")
            for mode, stages in res.items():
                print(_row(mode, stages[stage], base))
        return
    echo = asyncio.run(bench(a.payload, a.frames, a.rounds))
    base = statistics.median(echo["insecure"])
    print(f"payload {a.payload} B, {a.frames} frames x {a.rounds} rounds per mode, one frame in flight, loopback, "
          f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(header)
    for mode, t in echo.items():
        print(_row(mode, t, base))


if __name__ == "__main__":
    main()
