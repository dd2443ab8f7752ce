"""``python -m runtime.measure.grpc_echo``: a two-process grpc.aio echo that adds edgesplit's frame path one
piece at a time, to see which piece costs what (issue 14's runtime overhead; runtime/measure/results/overhead.md).

A client process writes one frame of ``--size`` bytes on a bidi stream and waits for a 4 KB answer, after
``--idle-ms`` of idle (as a frame arrives), ``--frames`` times after 5 unmeasured; it prints the p50 round trip.
Each configuration gets a fresh server process; the configurations alternate within each round (their order
reversed every other round). A configuration is ``NAME=LEVEL`` plus ``,VAR:VALUE`` environment settings for
both processes (``;`` stands for ``,`` inside a value), for example
``iomgr=bare,GRPC_EXPERIMENTS:-event_engine_client;-event_engine_listener``. Levels, each adding to the one before:

- ``bare``: a generic bidi handler, bytes in and out, gRPC's default options;
- ``opts``: ``TransportOptions``' server and channel options;
- ``icpt``: the daemon's interceptors (``AuthInterceptor``, without credentials, and ``ErrorStatusInterceptor``);
- ``pb``: frames as the agent sends them (``OutFrame``, ``serialize_request``), read by ``parse_request``,
  answered with an ``InferResult``;
- ``full``: the agent's reader task with a future per frame, the worker's stream shape (a reader task, a task
  per frame, a result queue) and the answer made on an executor thread (``runtime.wire.handoff.submit``).

Both processes run on the loop ``runtime.wire.eventloop`` picks, with its allocator settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from runtime.wire import eventloop

LEVELS = ("bare", "opts", "icpt", "pb", "full")
ANSWER_BYTES = 4096
WARMUP = 5
METHOD = "/edgesplit.v1.Inference/InferStream"
MAX_FRAME_BYTES = 8 * 2**20  # TransportOptions' message cap
START_SECONDS = 30.0  # a server must be up within this
CLIENT_SECONDS = 300.0  # and a client done within this


def _same(b: Any) -> Any:
    return b


def _options(level: int, server: bool) -> list[tuple[str, int]]:
    from runtime.wire.transport import TransportOptions

    if level < LEVELS.index("opts"):
        return []
    t = TransportOptions()
    return t.server_options(frames=True) if server else t.channel_options()


def _answer_maker(level: int) -> tuple[Callable[[Any], Any], Callable[[Any], Any], Callable[[Any], Any]]:
    """(make the answer to a request, request deserializer, response serializer) for a level."""
    if level < LEVELS.index("pb"):
        answer = bytes(ANSWER_BYTES)
        return (lambda req: answer), _same, _same
    from runtime.proto.edgesplit.v1 import inference_pb2 as pb
    from runtime.proto.edgesplit.v1 import tensor_pb2
    from runtime.wire.framewire import parse_request

    out = bytes(ANSWER_BYTES)

    def make(req: Any) -> Any:
        return pb.InferResult(header=req.frame.header,
                              output=tensor_pb2.Tensor(shape=[1, ANSWER_BYTES // 4], dtype="float32", buffer=out))
    return make, parse_request, lambda m: m.SerializeToString()


def _handler(level: int, make: Callable[[Any], Any]) -> Callable[..., Any]:
    if level < LEVELS.index("full"):
        async def simple(requests: Any, context: Any) -> Any:
            async for req in requests:
                yield make(req)
        return simple
    from runtime.wire.handoff import submit

    executor = ThreadPoolExecutor(1, thread_name_prefix="tail")

    async def session(requests: Any, context: Any) -> Any:
        results: asyncio.Queue[Any] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(req: Any) -> None:
            await results.put(await submit(executor, lambda: make(req)))

        async def reader() -> None:
            try:
                async for req in requests:
                    task = asyncio.create_task(one(req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                await results.put(None)

        read = asyncio.create_task(reader())
        try:
            while (res := await results.get()) is not None:
                yield res
        finally:
            read.cancel()
    return session


async def serve(level_name: str, port_file: str) -> None:
    """The echo server at a level; its port is written to ``port_file``; runs until killed."""
    level = LEVELS.index(level_name)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if level >= LEVELS.index("icpt"):
        from runtime.daemon.auth import AuthInterceptor
        from runtime.daemon.interceptors import ErrorStatusInterceptor
        from runtime.wire.security import SecurityOptions

        interceptors = [AuthInterceptor(SecurityOptions()), ErrorStatusInterceptor()]
    server = grpc.aio.server(options=_options(level, server=True), interceptors=interceptors)
    make, deserialize, serialize = _answer_maker(level)
    method = grpc.stream_stream_rpc_method_handler(_handler(level, make), request_deserializer=deserialize,
                                                   response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("edgesplit.v1.Inference",
                                                                          {"InferStream": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    await server.wait_for_termination()


def _frames(level: int, size: int) -> tuple[Callable[[int], Any], Callable[[Any], Any], Callable[[Any], Any]]:
    """(frame i, request serializer, response deserializer) for a level."""
    if level < LEVELS.index("pb"):
        payload = bytes(size)
        return (lambda i: payload), _same, _same
    from runtime.proto.edgesplit.v1 import inference_pb2 as pb
    from runtime.proto.edgesplit.v1 import tensor_pb2
    from runtime.wire.framewire import OutFrame, serialize_request

    payload = memoryview(bytearray(size))

    def frame(i: int) -> OutFrame:
        header = pb.FrameHeader(seq=i, agent_id="echo", model_id="echo", split_id="echo")
        tensor = tensor_pb2.Tensor(shape=[1, size], dtype="uint8", chunks=1)
        return OutFrame(pb.StreamRequest(frame=pb.InferRequest(header=header, tensor=tensor)), payload)
    return frame, serialize_request, pb.InferResult.FromString


async def client(port: int, level_name: str, frames: int, size: int, idle: float) -> list[float]:
    """Round-trip seconds of ``frames`` frames (after WARMUP) on one stream to the server at ``port``."""
    level = LEVELS.index(level_name)
    frame, serialize, deserialize = _frames(level, size)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_options(level, server=False)) as channel:
        call = channel.stream_stream(METHOD, request_serializer=serialize, response_deserializer=deserialize)()
        pending: dict[int, asyncio.Future[Any]] = {}

        async def read() -> None:  # the agent's shape: results read by a task of their own
            seq = 0
            async for res in call:
                fut = pending.pop(seq, None)
                seq += 1
                if fut is not None:
                    fut.set_result(res)

        reader = asyncio.create_task(read()) if level >= LEVELS.index("full") else None
        times = []
        for i in range(frames + WARMUP):
            await asyncio.sleep(idle)
            msg = frame(i)
            t0 = time.perf_counter()
            if reader is not None:
                pending[i] = asyncio.get_running_loop().create_future()
                await call.write(msg)
                await pending[i]
            else:
                await call.write(msg)
                await call.read()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
        await call.done_writing()
        if reader is not None:
            await reader
    return times


def parse_config(text: str) -> tuple[str, str, dict[str, str]]:
    """``NAME=LEVEL[,VAR:VALUE...]`` -> (name, level, environment)."""
    name, sep, spec = text.partition("=")
    level, *settings = spec.split(",")
    if not sep or not name or level not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=LEVEL[,VAR:VALUE...] with LEVEL one of {', '.join(LEVELS)}")
    env = {}
    for s in settings:
        var, colon, value = s.partition(":")
        if not colon or not var:
            raise argparse.ArgumentTypeError(f"{text!r}: {s!r} is not VAR:VALUE")
        env[var] = value.replace(";", ",")
    return name, level, env


def _module(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.measure.grpc_echo", *args]


def run_config(level: str, env: dict[str, str], frames: int, size: int, idle: float) -> list[float]:
    """One configuration: a fresh server process, a client process; the client's round trips (seconds)."""
    full_env = {**os.environ, **env}
    with tempfile.TemporaryDirectory(prefix="grpc-echo-") as tmp:
        port_file = os.path.join(tmp, "port")
        server = subprocess.Popen(_module("--serve", level, "--port-file", port_file), env=full_env)
        try:
            deadline = time.monotonic() + START_SECONDS
            while not os.path.exists(port_file):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {level} echo server did not start (exit {server.poll()})")
                time.sleep(0.05)
            with open(port_file) as f:
                port = f.read().strip()
            out = subprocess.run(_module("--client", port, "--level", level, "--frames", str(frames), "--size", str(size),
                                         "--idle-ms", str(idle * 1e3)),
                                 env=full_env, capture_output=True, text=True, timeout=CLIENT_SECONDS, check=False)
            if out.returncode:
                raise RuntimeError(f"the {level} echo client failed: {out.stderr.strip()[-2000:]}")
            times: list[float] = json.loads(out.stdout.strip().splitlines()[-1])
            return times
        finally:
            server.kill()
            server.wait()


def _positive(limit: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        n = int(text)
        if not 1 <= n <= limit:
            raise argparse.ArgumentTypeError(f"{n} is outside 1..{limit}")
        return n
    return check


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.measure.grpc_echo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", type=parse_config, metavar="NAME=LEVEL[,VAR:VALUE...]",
                   help="configurations to compare (default: one per level)")
    p.add_argument("--size", type=_positive(MAX_FRAME_BYTES), default=802_847, help="frame bytes (default 802847)")
    p.add_argument("--frames", type=_positive(10_000), default=60, help="measured frames per run (default 60)")
    p.add_argument("--rounds", type=_positive(100), default=4, help="runs of every configuration (default 4)")
    p.add_argument("--idle-ms", type=float, default=20.0, help="idle before each frame, 0-10000 ms (default 20)")
    p.add_argument("--serve", choices=LEVELS, help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)
    p.add_argument("--level", choices=LEVELS, default="bare", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.idle_ms <= 10_000:
        raise SystemExit("--idle-ms: expected 0-10000")
    if args.serve:
        eventloop.run(serve(args.serve, args.port_file))
        return 0
    if args.client is not None:
        times = eventloop.run(client(args.client, args.level, args.frames, args.size, args.idle_ms / 1e3))
        print(json.dumps(times))
        return 0
    configs = args.configs or [(level, level, {}) for level in LEVELS]
    medians: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    print(f"`python -m runtime.measure.grpc_echo {' '.join(sys.argv[1:])}`: {args.size:,} B out, {ANSWER_BYTES:,} B back, "
          f"{args.idle_ms:g} ms idle before each of {args.frames} frames; p50 ms per round\n", flush=True)
    for r in range(args.rounds):
        for name, level, env in configs if r % 2 == 0 else configs[::-1]:
            medians[name].append(statistics.median(run_config(level, env, args.frames, args.size, args.idle_ms / 1e3)) * 1e3)
    print("| configuration | rounds | median |\n|---|---|---:|")
    for name, values in medians.items():
        print(f"| {name} | {' / '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
