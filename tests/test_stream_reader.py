"""EdgeStream's reader (runtime.wire.stream): a frame's result reaches the frame's task before the reader's own
bookkeeping (the liveness record, its next read), which used to sit in the frame's path (issue 14). Order only,
no timing; a stand-in call object yields the results."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge

from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.stream import EdgeStream
from runtime.wire.transport import TransportOptions


class Metrics:
    def __init__(self):
        r = CollectorRegistry()
        self.stream_up = Gauge("up", "", registry=r)
        self.reconnects = Counter("opens", "", registry=r)


class Call:
    """What the reader uses of a grpc.aio stream call: its initial metadata and its results, in order."""

    def __init__(self, results, order):
        self.results, self.order = results, order

    async def initial_metadata(self):
        return ()

    def __aiter__(self):
        return self._read()

    async def _read(self):
        for res in self.results:
            yield res
            self.order.append(f"next read after {res.header.seq}")


def _result(seq: int, epoch: int = 1) -> pb.InferResult:
    res = pb.InferResult()
    res.header.seq, res.header.stream_epoch = seq, epoch
    return res


def test_the_frame_runs_before_the_readers_bookkeeping_and_next_read():
    async def main():
        order: list[str] = []
        stream = EdgeStream("127.0.0.1:1", TransportOptions(), Metrics(), connect_timeout=1.0, reconnect=0.5)
        call = Call([_result(7), _result(8)], order)
        stream._call, stream.epoch = call, 1
        answered = stream._live.answered
        stream._live.answered = lambda seq: (order.append(f"liveness {seq}"), answered(seq))
        loop = asyncio.get_running_loop()
        stream._pending = {7: loop.create_future(), 8: loop.create_future()}

        async def frame(seq: int) -> int:
            res = await stream._pending[seq]
            order.append(f"frame {seq}")
            return res.header.seq

        frames = [asyncio.create_task(frame(seq)) for seq in (7, 8)]
        await asyncio.sleep(0)  # the frames wait on their futures
        await stream._read(call, 1)
        return order, await asyncio.gather(*frames), stream._live.outstanding, stream._pending

    order, seqs, outstanding, pending = asyncio.run(main())
    assert seqs == [7, 8] and not pending and not outstanding
    assert order == ["frame 7", "liveness 7", "next read after 7", "frame 8", "liveness 8", "next read after 8"]


def test_a_result_nobody_waits_for_is_dropped_and_still_counts_as_progress():
    async def main():
        order: list[str] = []
        stream = EdgeStream("127.0.0.1:1", TransportOptions(), Metrics(), connect_timeout=1.0, reconnect=0.5)
        call = Call([_result(3)], order)
        stream._call, stream.epoch = call, 1
        answered = stream._live.answered
        stream._live.answered = lambda seq: (order.append(f"liveness {seq}"), answered(seq))
        await stream._read(call, 1)
        return order

    assert asyncio.run(main()) == ["liveness 3", "next read after 3"]
