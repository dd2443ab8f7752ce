"""The stream part of ``python -m runtime.tools.abuse_check``: a real worker under mTLS, one agent opening
more InferStream calls than ``--max-streams-per-caller`` (default 4), then another agent opening streams
until ``--max-streams`` (8 here, 1024 by default) are open (runtime.daemon.streams StreamSlots). Prints
which streams ended and with what status, what the worker held, whether the remaining streams still
answer, and ``edgesplit_worker_streams_shed_total`` by reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from runtime.daemon.streams import OLDEST_ENDED, TOTAL_REFUSED
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.tools import pki
from runtime.wire.security import SecurityOptions
from runtime.wire.transport import TransportOptions

RPC = 10.0
OVER = 2  # streams a1 opens beyond its cap
TOTAL = 8  # --max-streams for this check: small, so the total is reached in a few streams


def _site(d: Path) -> None:
    ca = pki.make_ca()
    pki.write(ca, d, "ca")
    pki.write(pki.issue(ca, "worker", "w1", ("127.0.0.1",)), d, "worker-w1")
    for ident in ("a1", "a2"):
        pki.write(pki.issue(ca, "agent", ident), d, f"agent-{ident}")


def _agent(d: Path, ident: str) -> TransportOptions:
    return TransportOptions(security=SecurityOptions(ca_file=str(d / "ca.pem"), cert_file=str(d / f"agent-{ident}.pem"),
                                                     key_file=str(d / f"agent-{ident}.key")))


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(1000):  # bounded: 10 s
        if check():
            return
        await asyncio.sleep(0.01)
    raise RuntimeError(f"timed out after 10 s waiting for {what}")


async def _ended(call: Any) -> str:
    """How ``call`` ended: its status and message ("open" if it is still open after ``RPC`` seconds)."""
    try:
        while await asyncio.wait_for(call.read(), RPC) is not grpc.aio.EOF:
            pass
        return "OK"
    except asyncio.TimeoutError:
        return "open"
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name}: {e.details() or ''}"


async def _answers(call: Any, agent_id: str, seq: int) -> bool:
    """Whether ``call`` still answers a frame (an error result: the model is not served; the stream works)."""
    await call.write(pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(agent_id=agent_id, seq=seq,
                                                                                  model_id="none", split_id="x"))))
    result = await asyncio.wait_for(call.read(), RPC)
    return result is not grpc.aio.EOF and bool(result.header.seq == seq)


async def streams(d: Path) -> None:
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    _site(d)
    ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, ca_file=str(d / "ca.pem"),
                                  cert_file=str(d / "worker-w1.pem"), key_file=str(d / "worker-w1.key"),
                                  max_streams=TOTAL))
    cfg, slots, shed = ws.service.config, ws.service.stream_slots, ws.service.metrics.streams_shed
    address = f"127.0.0.1:{ws.port}"
    try:
        async with _agent(d, "a1").aio_channel(address) as c1, _agent(d, "a2").aio_channel(address) as c2:
            a1, a2 = pb_grpc.InferenceStub(c1), pb_grpc.InferenceStub(c2)  # type: ignore[no-untyped-call]  # generated, unannotated
            other = a2.InferStream(timeout=60.0)
            await _until(lambda: slots.open == 1, "a2's first stream")
            mine, waits = [], []
            for i in range(cfg.max_streams_per_caller + OVER):  # one at a time: the order (oldest first) is known
                mine.append(a1.InferStream(timeout=60.0))
                t0 = time.perf_counter()
                await _until(lambda: slots.open + slots.ended == len(mine) + 1, f"a1's stream {i + 1}")
                if i >= cfg.max_streams_per_caller:  # this one ended a1's oldest: how long until that one saw it
                    waits.append((await _ended(mine[i - cfg.max_streams_per_caller]), time.perf_counter() - t0))
            answer = [await _answers(c, "a1", i) for i, c in enumerate(mine[OVER:])] + [await _answers(other, "a2", 0)]
            print(f"streams: agent a1 opened {len(mine)} InferStream calls (--max-streams-per-caller "
                  f"{cfg.max_streams_per_caller}): its oldest {len(waits)} ended, each "
                  f"{max(w for _, w in waits) * 1e3:.0f} ms or less after the newer one opened -> {waits[0][0]!r}; the "
                  f"worker then held {slots.held('cert:agent/a1')} of a1's and {slots.open} in all; a1's {len(mine) - OVER} "
                  f"newest and a2's stream answered a frame: {answer.count(True)} of {len(answer)}")
            more = [other]
            while slots.open < TOTAL:  # a2 fills the total (its own cap is not reached: 8 - 4 = 4)
                more.append(a2.InferStream(timeout=60.0))
                await _until(lambda: slots.held("cert:agent/a2") == len(more), "a2's streams")
            late = await _ended(a2.InferStream(timeout=60.0))
            print(f"streams: with --max-streams {TOTAL} open ({slots.held('cert:agent/a1')} of a1's, "
                  f"{slots.held('cert:agent/a2')} of a2's), a2's next stream -> {late!r}; streams ended for it: "
                  f"{slots.ended - len(waits)}; edgesplit_worker_streams_shed_total{{reason={OLDEST_ENDED}}} "
                  f"{shed.labels(OLDEST_ENDED)._value.get():g}, {{reason={TOTAL_REFUSED}}} "
                  f"{shed.labels(TOTAL_REFUSED)._value.get():g}")
            for call in mine + more:
                call.cancel()
            await _until(lambda: slots.open == 0, "every stream's end")
    finally:
        await ws.drain_and_stop(0.5)


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(streams(Path(tmp)))


if __name__ == "__main__":
    main()
