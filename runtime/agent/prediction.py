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

A fallback table's entry carries no bytes (planner.fallbacks.lean): for it ``bytes`` are those the agent
measured for its split and codec (runtime.agent.wirebytes), which the planner prices it with once it
has them (planner.wirebytes). Only a plan with one link (the agent's: no next hops, no parallel stage)
is re-costed; a plan with none (local), an unmeasured link or a figure missing keeps its issued prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.proto.edgesplit.v1 import planner_pb2 as ppb


@dataclass(frozen=True)
class Prediction:
    seconds: float  # as issued
    bytes: int = 0  # on the agent's link per frame (0: not in the plan)
    rtt: float = 0.0  # the issued link terms (seconds)
    transfer: float = 0.0
    ret: float = 0.0

    @classmethod
    def of(cls, plan: ppb.Plan) -> Prediction:
        terms = {k.partition(":")[0]: v for k, v in plan.breakdown_seconds.items() if k.startswith(("rtt:", "transfer:",
                                                                                                    "return:"))}
        if (not plan.worker_address or plan.next_hops or plan.parallel.worker_addresses
                or terms.get("transfer", 0.0) <= 0 or len([k for k in plan.breakdown_seconds if k.startswith("transfer:")]) != 1):
            return cls(plan.predicted_seconds)
        return cls(plan.predicted_seconds, plan.predicted_bytes, terms.get("rtt", 0.0), terms["transfer"],
                   terms.get("return", 0.0))

    def now(self, link: Any, measured_bytes: float = 0.0) -> float:
        """Re-costed at ``link`` (a runtime.agent.estimator.LinkEstimate, or None: as issued); ``measured_bytes``:
        the agent's figure for the configuration, used when the plan carries none (a fallback entry)."""
        size = self.bytes or measured_bytes
        if link is None or self.transfer <= 0 or size <= 0 or not link.bandwidth.samples or link.bandwidth.value <= 0:
            return self.seconds
        bw = link.bandwidth.value
        issued_bw = size / self.transfer
        rtt = link.rtt.value if link.rtt.value > 0 else self.rtt
        return self.seconds - self.rtt - self.transfer - self.ret + rtt + size / bw + self.ret * issued_bw / bw
