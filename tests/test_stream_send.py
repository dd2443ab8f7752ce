"""EdgeStream.send's write lock (issue 14): taken at once when no frame holds or waits for it (no
asyncio.wait_for and its task per frame), and waited for within the frame's deadline when one does. The control
messages (a FrameCancel, a StreamProbe) go behind the frame being written, not on a reopened stream; a failed cancel
is let go, a failed probe ends the stream."""

from __future__ import annotations

import asyncio
import time

import pytest

from runtime.agent.metrics import AgentMetrics
from runtime.contracts.errors import DeadlineExceeded
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire import stream as stream_mod
from runtime.wire.stream import EdgeStream
from runtime.wire.transport import TransportOptions

pytestmark = pytest.mark.timeout(60)


class _Call:
    """An open stream for send's purposes: it records what is written; ``gate`` (if set) holds each write."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.gate: asyncio.Event | None = None

    async def write(self, msg: pb.StreamRequest) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.written.append(msg.frame.header.seq)


def _frame(seq: int) -> pb.InferRequest:
    req = pb.InferRequest(header=pb.FrameHeader(seq=seq, agent_id="a"))
    req.tensor.buffer = b"x" * 100
    return req


def _stream() -> tuple[EdgeStream, _Call]:
    stream = EdgeStream("127.0.0.1:1", TransportOptions(), AgentMetrics(), 1.0, 1.0)
    call = _Call()
    stream._call = call  # type: ignore[assignment]
    return stream, call


def test_a_free_lock_is_taken_without_wait_for(monkeypatch):
    def no_wait_for(*args, **kwargs):
        raise AssertionError("wait_for used with the write lock free")

    async def scenario():
        stream, call = _stream()
        monkeypatch.setattr(stream_mod.asyncio, "wait_for", no_wait_for)
        for seq in (1, 2, 3):
            await stream.send(_frame(seq), deadline=time.monotonic() + 5.0)
        return call.written, stream._writers, stream._write_lock.locked()

    assert asyncio.run(scenario()) == ([1, 2, 3], 0, False)


def test_a_frame_already_past_its_deadline_is_not_started():
    async def scenario():
        stream, call = _stream()
        with pytest.raises(DeadlineExceeded, match="before it was sent"):
            await stream.send(_frame(4), deadline=time.monotonic() - 0.01)
        return call.written, 4 in stream._pending, stream._writers

    assert asyncio.run(scenario()) == ([], False, 0)


def test_a_frame_behind_another_waits_within_its_deadline():
    """Frame 5's write is held; frame 6 finds the lock taken and gives up at its own deadline, and frame 7,
    with time enough, is written after frame 5 (the lock handed on in order)."""
    async def scenario():
        stream, call = _stream()
        call.gate = asyncio.Event()
        first = asyncio.create_task(stream.send(_frame(5), deadline=time.monotonic() + 5.0))
        await asyncio.sleep(0.01)  # frame 5 holds the lock, its write waiting on the gate
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="frames ahead"):
            await stream.send(_frame(6), deadline=t0 + 0.1)
        waited = time.monotonic() - t0
        third = asyncio.create_task(stream.send(_frame(7), deadline=time.monotonic() + 5.0))
        await asyncio.sleep(0.01)
        call.gate.set()
        await asyncio.gather(first, third)
        return call.written, waited, stream._writers

    written, waited, writers = asyncio.run(scenario())
    assert written == [5, 7] and writers == 0
    assert 0.05 < waited < 5.0


class _Kinds(_Call):
    """Records each message as (kind, frame seq / cancelled seq / probe id); ``fail``: each write raises it."""

    def __init__(self, fail: BaseException | None = None) -> None:
        super().__init__()
        self.kinds: list[tuple[str, int]] = []
        self.fail = fail

    async def write(self, msg: pb.StreamRequest) -> None:
        if self.fail is not None:
            raise self.fail
        if self.gate is not None:
            await self.gate.wait()
        kind = msg.WhichOneof("kind")
        self.kinds.append((kind, {"frame": msg.frame.header.seq, "cancel": msg.cancel.seq, "probe": msg.probe.id}[kind]))


def test_a_cancel_and_a_probe_wait_behind_the_frame_being_written():
    async def scenario():
        stream = EdgeStream("127.0.0.1:1", TransportOptions(), AgentMetrics(), 1.0, 1.0)
        stream._call = call = _Kinds()  # type: ignore[assignment]
        call.gate = asyncio.Event()
        frame = asyncio.create_task(stream.send(_frame(5)))
        await asyncio.sleep(0.01)  # frame 5 holds the lock, its write waiting on the gate
        stream.abandon(9)
        probe = asyncio.create_task(stream._write_probe(call, 1))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        held = list(call.kinds), stream._writers
        call.gate.set()
        await asyncio.gather(frame, probe, *stream._cancels)
        return held, call.kinds, stream._writers, stream.is_open

    held, kinds, writers, is_open = asyncio.run(scenario())
    assert held == ([], 3)  # the frame, the cancel and the probe hold or wait for the lock
    assert kinds == [("frame", 5), ("cancel", 9), ("probe", 1)] and writers == 0 and is_open


def test_control_messages_for_a_reopened_stream_are_not_written():
    async def scenario():
        stream = EdgeStream("127.0.0.1:1", TransportOptions(), AgentMetrics(), 1.0, 1.0)
        old, new = _Kinds(), _Kinds()
        stream._call = new  # type: ignore[assignment]
        await stream._cancel(old, 3)  # type: ignore[arg-type]
        await stream._write_probe(old, 1)  # type: ignore[arg-type]
        return old.kinds, new.kinds, stream._writers, stream._call is new

    assert asyncio.run(scenario()) == ([], [], 0, True)


@pytest.mark.parametrize("error", [RuntimeError("closed"), asyncio.InvalidStateError("done")])
def test_a_failed_cancel_is_let_go_and_a_failed_probe_ends_the_stream(error):
    async def scenario():
        stream = EdgeStream("127.0.0.1:1", TransportOptions(), AgentMetrics(), 1.0, 1.0)
        stream._call = call = _Kinds(fail=error)  # type: ignore[assignment]
        waiting = asyncio.get_running_loop().create_future()
        stream._pending[4] = waiting
        await stream._cancel(call, 3)  # type: ignore[arg-type]
        after_cancel = stream.is_open, stream._writers
        await stream._write_probe(call, 1)  # type: ignore[arg-type]
        return after_cancel, stream.is_open, stream._writers, waiting.exception()

    after_cancel, is_open, writers, frame_error = asyncio.run(scenario())
    assert after_cancel == (True, 0)
    assert not is_open and writers == 0
    assert f"write failed: {type(error).__name__}" in str(frame_error)  # the frame waiting on it hears why
