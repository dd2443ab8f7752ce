"""A plan's predicted latency, re-costed at the link the agent measures now (issue 11).

The planner issues a plan with the latency its cost model predicts at the link figures of that moment
(``Plan.breakdown_seconds``: per link ``rtt``, ``transfer`` = bytes / bandwidth, ``return``). A plan
kept across a bandwidth step (the same configuration stays best) is not issued again: plan versions
follow configurations and compute, not every move of the link. Its issued prediction then describes
another link. Each result line therefore carries the plan's prediction with the agent's own link terms
re-costed by the same model at the estimate the agent holds for that worker now (the figures it reports
to the planner)::

    predicted = issued - (rtt + transfer + return)_issued + rtt_now + bytes / bw_now + return_issued * bw_issued / bw_now
    bw_issued = bytes / transfer_issued          (bytes: Plan.predicted_bytes)

A fallback table's entry carries its bytes (planner.fallbacks.lean keeps them); a plan that has none
uses those the agent measured for its split and codec (runtime.agent.wirebytes). Only a plan with one
link (the agent's: no next hops, no parallel stage) is re-costed; a plan with none (local), an
unmeasured link or a figure missing keeps its issued prediction.

Two terms follow the workload rather than the plan alone (:func:`line`):

* **The frame's own bytes.** ``bytes`` above is a mean; a JPEG's size follows the picture (adapt_run's
  four photos: 7.7-16.7 KB, 62-134 ms apart at 1 Mbit/s, which alone put single frames 13 % around
  the plan's figure). A result line's prediction prices the bytes that frame put on the wire, known on
  the board before its transfer starts, at the same bandwidth: ``frame_bytes / bw_now``.
* **The link's queue.** At the camera's interval ``T`` (the agent's ``--fps``) the link is busy
  ``rho = (bytes / bw_now) / T`` of the time, and a frame waits for the one before it with the expected
  wait of runtime.contracts.queueing (Kingman, paced arrivals, the link's measured jitter as the
  service's variance; capped by the window; drop-limited at ``rho >= 1``). The plan's issued
  ``queue:link`` term (the planner's figure at the issued link) is replaced by the one at ``bw_now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.contracts.queueing import DEFAULT_WINDOW, expected_wait
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb


@dataclass(frozen=True)
class Prediction:
    seconds: float  # as issued
    bytes: int = 0  # on the agent's link per frame (0: not in the plan)
    rtt: float = 0.0  # the issued link terms (seconds)
    transfer: float = 0.0
    ret: float = 0.0
    queue: float = 0.0  # the issued wait for the link (``queue:link``; planner.decide)

    @classmethod
    def of(cls, plan: ppb.Plan) -> Prediction:
        terms = {k.partition(":")[0]: v for k, v in plan.breakdown_seconds.items() if k.startswith(("rtt:", "transfer:",
                                                                                                    "return:"))}
        if (not plan.worker_address or plan.next_hops or plan.parallel.worker_addresses
                or terms.get("transfer", 0.0) <= 0 or len([k for k in plan.breakdown_seconds if k.startswith("transfer:")]) != 1):
            return cls(plan.predicted_seconds)
        return cls(plan.predicted_seconds, plan.predicted_bytes, terms.get("rtt", 0.0), terms["transfer"],
                   terms.get("return", 0.0), plan.breakdown_seconds.get("queue:link", 0.0))

    def now(self, link: Any, measured_bytes: float = 0.0, *, frame_bytes: int = 0, interval: float = 0.0,
            window: int = DEFAULT_WINDOW) -> float:
        """Re-costed at ``link`` (a runtime.agent.estimator.LinkEstimate, or None: as issued); ``measured_bytes``:
        the agent's mean for the configuration (the plan's bytes when it carries none); ``frame_bytes``: the
        frame's own bytes on the wire (0: the mean); ``interval``: the source's frame interval in seconds
        (0: unknown, no queue term); ``window``: frames in flight."""
        size = self.bytes or measured_bytes
        if link is None or self.transfer <= 0 or size <= 0 or not link.bandwidth.samples or link.bandwidth.value <= 0:
            return self.seconds
        bw = link.bandwidth.value
        issued_bw = size / self.transfer
        rtt = link.rtt.value if link.rtt.value > 0 else self.rtt
        mean = measured_bytes or size  # the workload's bytes per frame: what keeps the link busy
        wait = expected_wait(mean / bw, interval, getattr(link, "jitter", 0.0), window=window)
        own = frame_bytes if frame_bytes > 0 else size
        return (self.seconds - self.rtt - self.transfer - self.ret - self.queue
                + rtt + own / bw + self.ret * issued_bw / bw + wait.seconds)


def line(p: Prediction, estimator: Any, result: Any) -> float:
    """The prediction a result line carries for ``result`` (a FrameResult) under ``p``, by ``estimator`` (the
    agent's runtime.agent.telemetry.LinkEstimator: its link estimate, measured bytes and source interval)."""
    if not result.worker:
        return p.seconds
    return p.now(estimator.links.get(result.worker), estimator.wire.mean(result.split, result.codec),
                 frame_bytes=int(getattr(result, "wire_bytes", 0) or 0), interval=estimator.frame_interval,
                 window=estimator.frame_window)
