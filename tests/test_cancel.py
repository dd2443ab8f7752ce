"""Abandoned work is cancelled (issue 11): a frame past its deadline is not started on the wire, its
partial chunks are dropped by the worker, and a frame cancelled while it waits is not computed."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest import REPO, TINY_NET

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.metrics import AgentMetrics
from runtime.agent.sources import open_source
from runtime.contracts.errors import DeadlineExceeded
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.codec import get_codec
from runtime.wire.stream import EdgeStream
from runtime.wire.transport import FrameAssembler, TransportOptions
from runtime.worker.cancel import CancelledFrames
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve as serve_worker

pytestmark = pytest.mark.timeout(60)

TINY = f"{REPO / TINY_NET.split(':')[0]}:build"


def _frame(seq: int, chunks: int) -> pb.InferRequest:
    req = pb.InferRequest(header=pb.FrameHeader(seq=seq, agent_id="a", stream_epoch=1))
    req.tensor.buffer = b"x" * 100
    req.tensor.payload_size = 100 * chunks
    req.tensor.chunks = chunks
    return req


def test_the_assembler_drops_a_cancelled_frame_and_takes_the_next():
    asm = FrameAssembler(10_000)
    assert asm.feed(pb.StreamRequest(frame=_frame(7, 3))) is None
    assert not asm.cancel(8) and asm.pending_seq == 7  # another frame: nothing to drop
    assert asm.cancel(7) and asm.pending_seq is None
    whole = _frame(8, 1)
    assert asm.feed(pb.StreamRequest(frame=whole)).header.seq == 8


def test_cancelled_frames_are_refused_once_and_bounded():
    cf = CancelledFrames(limit=2)
    asm = FrameAssembler(10_000)
    cf.cancel(asm, ("a", 1), 5)  # not arriving: remembered
    header = pb.FrameHeader(agent_id="a", stream_epoch=1, seq=5)
    with pytest.raises(DeadlineExceeded, match="cancelled by its sender"):
        cf.check(header)
    cf.check(header)  # once only
    cf.check(pb.FrameHeader(agent_id="b", stream_epoch=1, seq=5))  # another agent's frame 5
    for seq in (1, 2, 3):
        cf.add("a", 1, seq)
    cf.check(pb.FrameHeader(agent_id="a", stream_epoch=1, seq=1))  # forgotten beyond the bound
    with pytest.raises(DeadlineExceeded):
        cf.check(pb.FrameHeader(agent_id="a", stream_epoch=1, seq=3))


def test_a_frame_past_its_deadline_is_not_started():
    """The write lock is held by a frame ahead of it; the deadline passes while it waits: nothing of
    it is written, and the caller hears DeadlineExceeded at its deadline, not after the other frame."""
    async def scenario():
        stream = EdgeStream("127.0.0.1:1", TransportOptions(), AgentMetrics(), 1.0, 1.0)
        stream._call = object()  # an open stream for send's purposes; nothing is written to it
        await stream._write_lock.acquire()
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="frames ahead"):
            await stream.send(_frame(3, 1), deadline=t0 + 0.2)
        waited = time.monotonic() - t0
        assert 3 not in stream._pending
        return waited

    assert asyncio.run(scenario()) < 5.0


def test_a_frame_cancelled_while_it_waits_is_not_computed_and_still_gets_one_result():
    loaded = load_model(TINY)
    x = next(iter(open_source(loaded.spec, "synthetic", 1))).tensor
    with torch.inference_mode():
        want = loaded.full(x)

    async def scenario():
        worker = await serve_worker(WorkerConfig(listen="127.0.0.1:0", models=(TINY,), torch_threads=1))
        agent = Agent(loaded, InitialPlan(loaded.split("stem"), get_codec("raw"), f"127.0.0.1:{worker.port}"),
                      AgentOptions(agent_id="board", deadline_seconds=10.0, connect_timeout=5.0))
        try:
            first = await agent.infer(x)
            agent.active.stream.abandon(1)  # the next frame's seq: the worker is told before it arrives
            key = ("board", agent.active.stream.epoch, 1)
            for _ in range(500):  # bounded: 5 s
                if key in worker.service.cancelled._keys:
                    break
                await asyncio.sleep(0.01)
            second = await agent.infer(x)
            metrics = worker.service.metrics.registry
            return first, second, metrics
        finally:
            await agent.close()
            await worker.drain_and_stop(1.0)

    first, second, metrics = asyncio.run(scenario())
    assert first.where == "edge", first.fallback_reason
    assert second.where == "local" and "cancelled by its sender" in second.fallback_reason
    assert torch.allclose(second.output, want, atol=1e-5)  # its one result, from the board
    assert metrics.get_sample_value("edgesplit_worker_cancelled_frames_total", {"stage": "queued"}) == 1
