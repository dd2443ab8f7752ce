"""Per-frame cost of transport security on loopback: plain, TLS + token, and mTLS.

A Daemon (the scaffold every endpoint uses, with its auth interceptor) serves an echo
``InferStream``: each frame of ``--payload`` bytes comes back as a small result, one frame in
flight, over one long-lived stream, as the agent sends them. The modes run interleaved in
``--rounds`` rounds so machine noise hits them alike; the figures are per-frame round-trip times.

    python -m runtime.tools.tls_bench --payload 100000 --frames 300 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from runtime.daemon.server import Daemon, DaemonOptions
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.tools import pki
from runtime.wire.security import SecurityOptions, token_digest
from runtime.wire.transport import TransportOptions


class Echo(pb_grpc.InferenceServicer):
    async def InferStream(self, request_iterator, context):
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
    await daemon.start(lambda s: pb_grpc.add_InferenceServicer_to_server(Echo(), s))
    times: list[float] = []
    try:
        async with TransportOptions(security=client).aio_channel(f"127.0.0.1:{daemon.port}") as ch:
            call = pb_grpc.InferenceStub(ch).InferStream(timeout=120.0)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--payload", type=int, default=100_000, help="bytes per frame (default: 100000)")
    p.add_argument("--frames", type=int, default=300, help="frames per run (default: 300)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every mode (default: 5)")
    a = p.parse_args()
    res = asyncio.run(bench(a.payload, a.frames, a.rounds))
    base = statistics.median(res["insecure"])
    print(f"payload {a.payload} B, {a.frames} frames x {a.rounds} rounds per mode, one frame in flight, loopback")
    print(f"{'mode':<10} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8} {'p50 vs insecure':>16}")
    for mode, t in res.items():
        t = sorted(t)
        p50, p95 = statistics.median(t), t[int(0.95 * (len(t) - 1))]
        print(f"{mode:<10} {p50 * 1e3:8.3f} {p95 * 1e3:8.3f} {statistics.fmean(t) * 1e3:8.3f} {100 * (p50 / base - 1):+15.1f}%")


if __name__ == "__main__":
    main()
