"""What the agent measures about its link to the worker, for the planner.

* Bandwidth (bytes/s) from real frame transfers, not from synthetic bulk tests: for an edge frame
  of ``b`` wire bytes, the time the bytes spent on the network is the whole send-to-result time
  minus what the worker reports it spent (queue, decode, tail, and for a chained frame the wait on
  its next tier) minus one round trip of latency::

      network = transfer_edge - edge_queue - edge_decode - edge_tail - edge_forward - rtt
      sample  = b / network        (only when network > 0 and b >= min_bytes)

  Frames under ``min_bytes`` (default 8 KiB) are skipped: on them the transfer takes about one
  round trip plus gRPC's per-message overhead, so ``network`` is mostly timer noise and a single
  small frame would report an absurd figure. The result message (a few hundred bytes of logits)
  is ignored. Under a window of concurrent frames ``transfer_edge`` also holds the wait for the
  stream's write lock, so the figure is the share of the link one frame gets, slightly below the
  raw link rate.
* RTT (seconds) from small probes on the same channel (``grpc.health.v1.Health/Check``, which
  every worker serves): same connection, same HTTP/2 path, negligible server work. The estimate is
  the *base* RTT, the smallest of the last ``rtt_window`` probes (default 8), not their average:
  on a busy link a probe waits in the link's queue behind the frames still being sent, so a
  probe measures the agent's own queueing as well. Subtracting that from ``transfer_edge`` made
  the bandwidth of a saturated slow link look several times faster than it was (and unbounded as
  the probe's wait approached the frame's), and the planner, which prices the transfer as
  ``bytes / bandwidth`` already, would count the queueing twice. Queueing only ever adds to a
  probe, so the minimum is the propagation part (as in BBR's min-RTT filter); a lasting change of
  the path shows after ``rtt_window`` probes.
* Bandwidth is smoothed with an exponentially weighted moving average, ``est = a * sample + (1 -
  a) * est`` with ``a = alpha`` (default 0.3: a step change is 90 % absorbed after ~7 samples, one
  slow frame moves the estimate by 30 %); the first sample initialises the estimate.
* Stage medians and the frame count since the last report (``take_report``).
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from typing import Any

import grpc

from runtime.agent.metrics import AgentMetrics
from runtime.contracts.errors import EdgesplitError
from runtime.wire.stream import time_health_check

MIN_BANDWIDTH_BYTES = 8 * 1024  # smaller frames say nothing about bandwidth (see the module docstring)
ALPHA = 0.3  # EWMA weight of a new sample
RTT_WINDOW = 8  # probes the base RTT is the minimum of
MAX_STAGE_SAMPLES = 4096  # per stage between reports; beyond that the oldest are dropped


class Ewma:
    """Exponentially weighted moving average; ``value`` is 0.0 until the first sample."""

    def __init__(self, alpha: float = ALPHA):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.value = 0.0
        self.samples = 0

    def add(self, sample: float) -> float:
        self.value = sample if self.samples == 0 else self.alpha * sample + (1 - self.alpha) * self.value
        self.samples += 1
        return self.value


class LinkEstimator:
    """Bandwidth and RTT of the link to the worker, and per-stage medians since the last report."""

    def __init__(self, metrics: AgentMetrics | None = None, *, alpha: float = ALPHA,
                 min_bytes: int = MIN_BANDWIDTH_BYTES, rtt_window: int = RTT_WINDOW):
        self.metrics = metrics
        self.min_bytes = min_bytes
        self._bandwidth = Ewma(alpha)
        self._rtt: deque[float] = deque(maxlen=rtt_window)
        self._stages: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=MAX_STAGE_SAMPLES))
        self._frames = 0

    @property
    def bandwidth_bytes_per_second(self) -> float:
        """Smoothed bandwidth; 0.0 = unknown (no frame big enough yet)."""
        return self._bandwidth.value

    @property
    def rtt_seconds(self) -> float:
        """Base round trip: the smallest of the last ``rtt_window`` probes; 0.0 = unknown (none answered yet)."""
        return min(self._rtt, default=0.0)

    def observe(self, result: Any) -> None:
        """Take one finished frame (a FrameResult): its stage times, and a bandwidth sample if it
        ran on the edge with enough bytes and a positive network time."""
        self._frames += 1
        for stage, seconds in result.times.items():
            self._stages[stage].append(seconds)
        t = result.times
        if result.where != "edge" or result.wire_bytes < self.min_bytes or "transfer_edge" not in t:
            return
        network = (t["transfer_edge"] - t.get("edge_queue", 0.0) - t.get("edge_decode", 0.0)
                   - t.get("edge_tail", 0.0) - t.get("edge_forward", 0.0) - self.rtt_seconds)
        if network > 0:
            self.add_bandwidth_sample(result.wire_bytes / network)

    def add_bandwidth_sample(self, bytes_per_second: float) -> None:
        value = self._bandwidth.add(bytes_per_second)
        if self.metrics is not None:
            self.metrics.link_bandwidth.set(value)

    def add_rtt_sample(self, seconds: float) -> None:
        self._rtt.append(seconds)
        if self.metrics is not None:
            self.metrics.link_rtt.set(self.rtt_seconds)

    async def probe_rtt(self, target: Any, timeout: float = 1.0) -> float | None:
        """Time one small unary call and add it to the RTT window; returns the sample, or
        None when the peer did not answer (the estimate is then left as it was).

        ``target``: a ``grpc.aio.Channel``, or an object with ``async probe_rtt(timeout)`` (the
        agent's EdgeStream, which probes over the channel its frames use).
        """
        try:
            if isinstance(target, grpc.aio.Channel):
                seconds = await time_health_check(target, timeout)
            else:
                seconds = await target.probe_rtt(timeout)
        except (EdgesplitError, grpc.RpcError):
            return None
        if seconds is None:
            return None
        self.add_rtt_sample(seconds)
        return seconds

    def take_report(self) -> tuple[dict[str, float], int]:
        """``(median seconds by stage, frames)`` since the previous call; resets both."""
        medians = {stage: statistics.median(v) for stage, v in self._stages.items() if v}
        frames, self._frames = self._frames, 0
        self._stages.clear()
        return medians, frames

