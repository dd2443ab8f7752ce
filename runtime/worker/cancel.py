"""Frames their senders gave up on (``StreamRequest.cancel``, issue 11): a frame whose deadline passed
at the agent is dropped by the worker if it has not started, so it stops taking the worker (and,
through the chunks no longer sent, the link) from the frames behind it. A frame already computing
runs to its end; its result is dropped by the agent."""

from __future__ import annotations

import threading
from collections import OrderedDict

from prometheus_client import Counter

from runtime.contracts.errors import DeadlineExceeded
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.transport import FrameAssembler
from runtime.worker.metrics import WorkerMetrics

MAX_CANCELLED = 4096  # cancellations remembered (the oldest are forgotten: their frames are long done)


class CancelledFrames:
    """Bounded, thread-safe set of cancelled frames, keyed by (agent id, stream epoch, seq)."""

    def __init__(self, metrics: WorkerMetrics | None = None, limit: int = MAX_CANCELLED):
        self.limit = limit
        self.counter: Counter | None = None
        if metrics is not None:  # on the worker's registry, owned here (one concern, one module)
            self.counter = Counter("edgesplit_worker_cancelled_frames", "Frames their sender gave up on, dropped before "
                                   "computing, by where they were (arriving: chunks still coming; queued)", ["stage"],
                                   registry=metrics.registry)
        self._keys: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(header: pb.FrameHeader) -> tuple[str, int, int]:
        return header.agent_id, header.stream_epoch, header.seq

    def cancel(self, assembler: FrameAssembler, origin: tuple[str, int], seq: int) -> None:
        """A ``FrameCancel`` for ``seq`` on a stream whose frames come from ``origin`` (agent id,
        stream epoch): dropped at once while its chunks arrive, else remembered for ``check``."""
        if assembler.cancel(seq):
            self._count("arriving")
        else:
            self.add(*origin, seq)

    def _count(self, stage: str) -> None:
        if self.counter is not None:
            self.counter.labels(stage).inc()

    def add(self, agent_id: str, epoch: int, seq: int) -> None:
        with self._lock:
            self._keys[(agent_id, epoch, seq)] = None
            while len(self._keys) > self.limit:
                self._keys.popitem(last=False)

    def check(self, header: pb.FrameHeader) -> None:
        """Raise DeadlineExceeded (and forget the key) when the frame of ``header`` was cancelled."""
        with self._lock:
            hit = self._keys.pop(self.key(header), False) is None
        if hit:
            self._count("queued")
            raise DeadlineExceeded(f"frame {header.seq} was cancelled by its sender (its deadline passed); not computed")
