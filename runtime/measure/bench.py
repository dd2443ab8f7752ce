"""``edgesplit bench``: per-frame latency by stage, bytes per frame and runtime overhead per codec.

A worker runs as a child process on loopback; the agent runs in this process with one frame
in flight, so every stage time is clean. Overhead = end-to-end - (head + tail compute): what
the runtime itself adds (encode, decode, gRPC, scheduling) and the bytes' trip over loopback. Beside it, each row's
loopback floor (:mod:`runtime.measure.loopback_floor`: the same bytes each way between two processes over a plain
TCP socket, with the row's head and tail as the idle times) and the overhead over compute + transfer (overhead
less that floor: issue 14's measure, as the headline's scenarios subtract bytes / bandwidth + RTT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.run import choose_split
from runtime.agent.sources import open_source
from runtime.agent.summary import runtime_overhead
from runtime.contracts.errors import InvalidInput
from runtime.measure import loopback_floor
from runtime.models.loader import load_model
from runtime.wire import eventloop
from runtime.wire.codec import codec_names, get_codec
from runtime.worker.process import spawn_worker

if TYPE_CHECKING:
    from runtime.agent.frame import FrameResult
    from runtime.models.loader import LoadedModel
    from runtime.models.slicing import SplitPoint
    from runtime.transfer.artifact import LoadedTL


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def _bench_one(loaded: LoadedModel, split: SplitPoint, codec: str, address: str, frames: int, warmup: int,
                     window: int, tl: LoadedTL | None = None) -> dict[str, Any]:
    model = tl.tl.entropy_model if tl is not None else None
    plan = InitialPlan(split, get_codec(codec, model=model, spec=loaded.spec), worker=address, tl=tl)
    agent = Agent(loaded, plan, AgentOptions(deadline_seconds=30.0))
    await agent.start()
    inputs = [f.tensor for f in open_source(loaded.spec, "synthetic", 8)]
    results = []
    sem = asyncio.Semaphore(window)

    async def one(i: int) -> FrameResult:
        async with sem:
            return await agent.infer(inputs[i % len(inputs)])

    for i in range(warmup):
        await one(i)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(frames)))
    wall = time.perf_counter() - t0
    await agent.close()
    edge = [r for r in results if r.where == "edge"]
    if len(edge) != len(results):
        reasons = {r.fallback_reason for r in results if r.where != "edge"}
        raise RuntimeError(f"{len(results) - len(edge)} frames ran locally during the benchmark: {reasons}")
    def stage(k: str) -> float:
        return _median([r.times[k] * 1e3 for r in edge])

    return {
        "tl": tl.tl_id if tl is not None else "",
        "split": split.name, "split_index": split.index, "shape": list(split.out_shape), "codec": codec,
        "frames": len(edge), "bytes_per_frame": _median([r.wire_bytes for r in edge]),
        "raw_fp32_bytes": split.fp32_bytes,
        "p50_ms": {k: stage(k) for k in ("head", *(("tl_encode",) if tl is not None else ()), "encode", "transfer_edge",
                                         "edge_queue", "edge_decode", "edge_tail", "total")},
        "overhead_p50_ms": _median([runtime_overhead(r) * 1e3 for r in edge]),
        "network_p50_ms": _median([(r.times["transfer_edge"] - r.times["edge_tail"] - r.times["edge_decode"]
                                    - r.times["edge_queue"]) * 1e3 for r in edge]),
        "throughput_fps": len(edge) / wall,
        "overhead_parts_p50_ms": overhead_parts(edge),
        "result_bytes": edge[0].output.numel() * edge[0].output.element_size() + RESULT_HEADER_BYTES,
    }


RESULT_HEADER_BYTES = 128  # a result's header, times and shape beside its tensor (the loopback floor's answer)


def add_floor(row: dict[str, Any], frames: int) -> None:
    """The row's loopback floor (its bytes up, its result's down, its head + encode as the idle before a send and its
    decode + tail as the hold before the answer) and its overhead over compute + transfer, p50 ms."""
    p = row["p50_ms"]
    idle = (p["head"] + p.get("tl_encode", 0.0) + p["encode"]) / 1e3
    hold = (p["edge_decode"] + p["edge_tail"]) / 1e3
    floors = loopback_floor.measure(round(row["bytes_per_frame"]), row["result_bytes"], idle_s=idle, hold_s=hold,
                                    frames=frames)
    row["loopback_floor_p50_ms"] = _median([f * 1e3 for f in floors])
    row["overhead_over_floor_p50_ms"] = row["overhead_p50_ms"] - row["loopback_floor_p50_ms"]


def overhead_parts(edge: Sequence[FrameResult]) -> dict[str, float]:
    """The runtime overhead split by where it goes (p50 ms of each part; the parts' medians need not add up
    to the overhead's): the agent's hand-offs (board thread -> event loop -> gRPC, and the result's decode and
    bookkeeping after it arrives), codec work (encode, TL encoder, the worker's decode), gRPC both ways (the
    agent's write to its read of the result, less the worker's hold: loopback bytes, both gRPC stacks, the
    completion-queue wake-ups) and the worker's hand-offs (its hold less queue, decode and tail: executor ->
    event loop -> the result's write). Frames without the worker's timestamps leave the last two out."""
    parts: dict[str, list[float]] = {"agent": [], "codec": [], "grpc": [], "worker": []}
    for r in edge:
        t = r.times
        parts["agent"].append(t["total"] - t.get("board_queue", 0.0) - t["head"] - t.get("tl_encode", 0.0)
                              - t["encode"] - t["transfer_edge"])
        parts["codec"].append(t["encode"] + t.get("tl_encode", 0.0) + t["edge_decode"])
        if "edge_held" in t:
            parts["grpc"].append(t["transfer_edge"] - t["edge_held"])
            parts["worker"].append(t["edge_held"] - t["edge_queue"] - t["edge_decode"] - t["edge_tail"])
    return {k: _median([v * 1e3 for v in vs]) for k, vs in parts.items()}


def _local_full_ms(loaded: LoadedModel, n: int = 20) -> float:
    x = next(iter(open_source(loaded.spec, "synthetic", 1))).tensor
    times = []
    with torch.inference_mode():
        for i in range(n + 3):
            t = time.perf_counter()
            loaded.full(x)
            if i >= 3:
                times.append((time.perf_counter() - t) * 1e3)
    return _median(times)


def run_bench(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    tl = None
    if args.tl:
        from runtime.transfer.artifact import load_tl

        tl = load_tl(args.tl, loaded=loaded)
        if args.split and any(choose_split(loaded, s).name != tl.split.name for s in args.split):
            raise InvalidInput(f"--tl {tl.tl_id} is for split {tl.split.index} ({tl.split.name}); drop --split or match it")
    splits = [choose_split(loaded, s) for s in (args.split or [tl.split.name if tl is not None else ""])]
    codecs = args.codec or codec_names(tl.tl.entropy_model if tl is not None else None)
    worker = spawn_worker(["--torch-threads", str(args.threads), "--max-queue", "64", *(["--tl", args.tl] if tl else [])])
    rows = []
    try:
        with eventloop.Loop() as loop:  # one loop for every row (eventloop.Loop says why)
            for split in splits:
                for codec in codecs:
                    print(f"... {loaded.name} split {split.index} ({split.name}) codec {codec}", file=sys.stderr,
                          flush=True)
                    rows.append(loop.run(_bench_one(loaded, split, codec, worker.address, args.frames, args.warmup,
                                                    args.window, tl)))
    finally:
        worker.stop()
    for row in rows:  # with the worker gone: the link alone
        add_floor(row, args.frames)
    local_ms = _local_full_ms(loaded)
    cmd = "edgesplit bench " + " ".join(a for a in sys.argv[2:])
    print(f"\n`{cmd.strip()}` on {platform.machine()} {torch.get_num_threads()} torch thread(s) per side, "
          f"{args.frames} frames, window {args.window}; local full model p50 {local_ms:.2f} ms\n")
    print("| split | codec | bytes/frame | vs fp32 | head | encode | transfer+edge | edge decode | edge tail "
          "| network | overhead | total | fps |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p = r["p50_ms"]
        print(f"| {r['split_index']} {r['split']} {'x'.join(map(str, r['shape'][1:]))} | "
              f"{r['tl'] + '+' if r['tl'] else ''}{r['codec']} "
              f"| {r['bytes_per_frame']:,.0f} | {r['raw_fp32_bytes'] / r['bytes_per_frame']:.2f}x | {p['head']:.2f} "
              f"| {p['encode']:.2f} | {p['transfer_edge']:.2f} | {p['edge_decode']:.2f} | {p['edge_tail']:.2f} "
              f"| {r['network_p50_ms']:.2f} | {r['overhead_p50_ms']:.2f} | {p['total']:.2f} | {r['throughput_fps']:.1f} |")
    print("\nAll times are p50 in ms. overhead = total - (head + edge tail) - queueing; network = transfer+edge - "
          "(edge queue + decode + tail).")
    print("\nWhere the overhead goes (p50 ms of each part; runtime.measure.bench.overhead_parts):\n")
    print("| split | codec | bytes/frame | agent hand-offs | codec work | gRPC both ways | worker hand-offs | overhead "
          "| loopback floor | over compute + transfer |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o = r["overhead_parts_p50_ms"]
        print(f"| {r['split_index']} | {r['codec']} | {r['bytes_per_frame']:,.0f} | {o['agent']:.2f} | {o['codec']:.2f} "
              f"| {o['grpc']:.2f} | {o['worker']:.2f} | {r['overhead_p50_ms']:.2f} | {r['loopback_floor_p50_ms']:.2f} "
              f"| {r['overhead_over_floor_p50_ms']:.2f} |")
    print("\nloopback floor = the same bytes each way between two processes over a plain TCP socket, the row's head and "
          "tail as idle (runtime.measure.loopback_floor); over compute + transfer = overhead - loopback floor.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "model": loaded.name, "local_full_ms": local_ms, "rows": rows}, f, indent=1)
    return 0
