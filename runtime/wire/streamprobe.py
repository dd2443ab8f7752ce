"""The liveness probe carried on an open InferStream (issue 14): what the agent (runtime.wire.stream) and the
worker (runtime.worker.streaming) agree on.

The agent's idle liveness probe was a unary grpc.health.v1 Health/Check on the frames' connection, about two a
second on an idle stream: each a new call, a task and six completion-queue operations, ~2 ms/s of a board's CPU
(runtime/measure/results/agent_idle_cpu.md). A ``StreamProbe`` message on the stream already open is one write,
answered on the read the agent already has pending.

Negotiation: a worker that answers probes puts ``STREAM_PROBE_KEY: "1"`` in the stream's initial metadata, sent as
the stream opens (before any result). An older worker sends no such key (its metadata comes with its first
result), and the agent keeps Health/Check for that stream. An older agent never sends a probe, and so gets no echo.

Limits on the worker (SECURITY.md): a probe message over ``MAX_STREAM_PROBE_BYTES`` ends the stream
INVALID_ARGUMENT; beyond ``--max-stream-probes-per-second`` (a bucket of as many, refilled at that rate) the stream
ends RESOURCE_EXHAUSTED. Neither is buffered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

STREAM_PROBE_KEY = "edgesplit-stream-probe"
STREAM_PROBE_METADATA = (STREAM_PROBE_KEY, "1")
MAX_STREAM_PROBE_BYTES = 64  # a StreamRequest holding a probe (an id: at most 13 bytes) larger than this is refused
# edgesplit_worker_streams_shed_total reasons of a stream a worker ended for its probes (runtime.worker.metrics)
PROBE_RATE = "probe_rate"  # over --max-stream-probes-per-second
PROBE_SIZE = "probe_size"  # a probe message over MAX_STREAM_PROBE_BYTES
DEFAULT_STREAM_PROBES_PER_SECOND = 20.0  # an agent sends at most ~2 a second (one per answer, 0.5 s after it)


def advertised(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether a stream's initial metadata says its worker answers stream probes."""
    return any(k == STREAM_PROBE_KEY and v == "1" for k, v in (metadata or ()))


class RttRecord:
    """Round trips timed by stream probes on an idle stream (nothing queued ahead of them): a figure with its
    sample count and age, never a guess (0 samples: unknown)."""

    def __init__(self) -> None:
        self.samples = 0
        self.last = 0.0  # seconds
        self.smallest = 0.0
        self.at = 0.0  # time.monotonic() of the last sample

    def add(self, seconds: float, now: float) -> None:
        self.smallest = seconds if not self.samples else min(self.smallest, seconds)
        self.samples += 1
        self.last, self.at = seconds, now

    def age(self, now: float) -> float:
        return now - self.at if self.samples else float("inf")


class ProbeBucket:
    """At most ``rate`` probes a second on average and ``rate`` at once (a token bucket); 0 refuses every one."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.at = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
