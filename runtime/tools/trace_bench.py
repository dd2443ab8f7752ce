"""What tracing costs per frame: the hooks alone (off and on), and agent -> worker frames on loopback.

``python -m runtime.tools.trace_bench [--frames 300] [--hook-calls 20000]`` prints:

* the frame hooks' own cost (runtime.daemon.tracing.worker_frame around an empty coroutine):
  off (the shipped default) and on (spans into an in-memory exporter), in microseconds per call;
* median and p90 per-frame latency of digits_cnn split at pool1 (int8+lz4) through an in-process
  worker on 127.0.0.1, tracing off, then on with the file exporter (batch, as shipped), every frame
  and then 1 % of them (``--trace-sample-ratio 0.01``).

Runs in one process, one torch thread; figures vary with the machine's load (print ``uptime`` beside).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import torch

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.daemon import tracing
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.codec import get_codec
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve


class _Result:
    def __init__(self) -> None:
        self.times = pb.StageTimes(queue_seconds=1e-5, decode_seconds=1e-5, tail_seconds=1e-4)
        self.hops: list[pb.HopTimes] = []


async def _hook_cost(calls: int) -> float:
    """Microseconds per call of the worker frame hook around a coroutine that does nothing."""

    async def process(self: object, req: pb.InferRequest) -> _Result:
        return _Result()

    traced = tracing.worker_frame(process)
    req = pb.InferRequest(header=pb.FrameHeader(agent_id="a", model_id="m", split_id="s", seq=1))
    for fn in (process, traced):  # warm both
        await fn(None, req)
    best = []
    for fn in (process, traced):
        t0 = time.perf_counter()
        for _ in range(calls):
            await fn(None, req)
        best.append((time.perf_counter() - t0) / calls * 1e6)
    return best[1] - best[0]


async def _frames(n: int) -> list[float]:
    loaded = load_model("digits_cnn")
    worker = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
    agent = Agent(loaded, InitialPlan(loaded.split("pool1"), get_codec("int8+lz4"), worker=f"127.0.0.1:{worker.port}"),
                  AgentOptions(deadline_seconds=30.0))
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    try:
        await agent.start()
        for _ in range(20):  # warm-up
            await agent.infer(x)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = await agent.infer(x)
            out.append(time.perf_counter() - t0)
            assert r.where == "edge", r.fallback_reason
        return out
    finally:
        await agent.close()
        await worker.drain_and_stop(1.0)


def _fig(seconds: list[float]) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    return f"median {statistics.median(ms):.3f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--hook-calls", type=int, default=20000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    print(f"load average: {os.getloadavg()}")
    print(f"worker frame hook, tracing off: {asyncio.run(_hook_cost(args.hook_calls)):.2f} us per frame")
    tracing.configure(tracing.TracingSettings(), "trace-bench", exporter=InMemorySpanExporter())
    print(f"worker frame hook, tracing on (in-memory): {asyncio.run(_hook_cost(args.hook_calls // 4)):.2f} us per frame")
    tracing.shutdown()
    off = asyncio.run(_frames(args.frames))
    with tempfile.TemporaryDirectory(prefix="edgesplit-trace-bench-") as tmp:
        tracing.configure(tracing.TracingSettings(trace_exporter="file", trace_endpoint=os.path.join(tmp, "s.jsonl")),
                          "trace-bench")
        on = asyncio.run(_frames(args.frames))
        tracing.shutdown()
        tracing.configure(tracing.TracingSettings(trace_exporter="file", trace_endpoint=os.path.join(tmp, "s.jsonl"),
                                                  trace_sample_ratio=0.01), "trace-bench")
        sampled = asyncio.run(_frames(args.frames))
        tracing.shutdown()
    print(f"digits_cnn@pool1 int8+lz4, {args.frames} frames agent -> worker on loopback")
    print(f"  tracing off:         {_fig(off)}")
    print(f"  tracing on (file):   {_fig(on)}")
    print(f"  on, ratio 0.01:      {_fig(sampled)}")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
