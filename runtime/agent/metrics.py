"""Prometheus metrics of the device agent (one registry per agent instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.daemon.metrics_http import ERROR_CODES, STAGE_BUCKETS
from runtime.wire.crl import register_metrics as register_crl_metrics

STAGES = ("board_queue", "head", "tl_encode", "encode", "transfer_edge", "local_tail", "refine", "total")  # label values of stage_seconds
WHERE = ("edge", "local")  # label values of frames
# label values of fallbacks (reason_label): deadline, refused and unavailable are
# failures of the edge; given_up: frames the agent gave up when it left a collapsed link (EdgeStream.give_up);
# local_plan (the plan runs every layer here) and no_worker are planned local runs
FALLBACK_REASONS = ("deadline", "given_up", "refused", "unavailable", "local_plan", "no_worker")


def reason_label(reason: str) -> str:
    """Bounded label values for the fallback counter (moved here from runtime.agent.client, next to its values)."""
    for prefix, label in (("deadline", "deadline"), ("given up", "given_up"), ("worker refused", "refused"),
                          ("worker unavailable", "unavailable"), ("plan runs", "local_plan")):
        if reason.startswith(prefix):
            return label
    return "no_worker"


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        register_crl_metrics(r)  # edgesplit_server_certificate_refused_total (runtime.wire.crl)
        self.frames = Counter("edgesplit_agent_frames", "Frames with a result, by where they ran", ["where"], registry=r)
        self.fallbacks = Counter("edgesplit_agent_fallbacks", "Frames run locally instead of on the edge", ["reason"], registry=r)
        self.refined = Counter("edgesplit_agent_refined_frames", "Edge results too close to call (top-1 margin below "
                               "refine_margin) whose tail was re-run on the board", registry=r)
        self.stage_seconds = Histogram(
            "edgesplit_agent_stage_seconds", "Per-frame time by stage", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.sent_bytes = Counter("edgesplit_agent_sent_bytes", "Payload bytes sent to the worker", registry=r)
        self.raw_bytes = Counter("edgesplit_agent_raw_bytes", "Bytes of the split's output as the head computed it "
                                 "(before a Transfer Layer and the codec), of the same frames as sent_bytes: "
                                 "raw / sent is the compression ratio", registry=r)
        self.inflight = Gauge("edgesplit_agent_inflight_frames", "Frames sent and not yet answered", registry=r)
        self.stream_up = Gauge("edgesplit_agent_stream_up", "1 while a stream to the worker is open", registry=r)
        self.reconnects = Counter("edgesplit_agent_stream_opens", "Streams opened to the worker", registry=r)
        self.stream_deaths = Counter("edgesplit_agent_stream_deaths", "Streams and connections that died, by endpoint "
                                     "(worker: a frame stream; planner: the planner session) and reason (no_progress: "
                                     "frames outstanding and nothing back for max(1.5 s, 1.5 x their bytes / bandwidth + "
                                     "RTT); probe_unanswered: idle and a probe unanswered for 1.5 s; keepalive, "
                                     "unavailable, error, write_failed, closed_by_peer: gRPC's own endings; "
                                     "runtime.wire.liveness)", ["endpoint", "reason"], registry=r)
        # link estimates (runtime.agent.telemetry.LinkEstimator) and the plan in effect
        self.link_bandwidth = Gauge("edgesplit_agent_link_bandwidth_bytes_per_second",
                                    "Smoothed bandwidth to the worker, from real frame transfers (0: unknown)", registry=r)
        self.link_rtt = Gauge("edgesplit_agent_link_rtt_seconds",
                              "Base round trip: the smallest of the recent probes, on a connection of their own (0: unknown)", registry=r)
        self.band_switches = Counter("edgesplit_agent_band_switches", "Plans the agent took by itself from its plan's "
                                     "fallback table (runtime.agent.fallbacks), by direction (down: a slower band)",
                                     ["direction"], registry=r)
        self.dropped_frames = Counter("edgesplit_agent_dropped_frames", "Frames of a paced source (--fps) that arrived "
                                      "while --window frames were in flight, dropped unprocessed", registry=r)
        self.probe_bytes = Counter("edgesplit_agent_probe_bytes", "Bandwidth probe payload bytes sent (runtime.agent.prober)",
                                   registry=r)
        self.plan_version = Gauge("edgesplit_agent_plan_version", "Version of the plan the agent runs now", registry=r)
        self.plan_split_index = Gauge("edgesplit_agent_plan_split_index", "Split point index of the plan in effect "
                                      "(0: the input goes to the worker; the model's last index, 'output': all on the "
                                      "board; 'edgesplit models MODEL' lists them)", registry=r)
        self.plan_switches = Counter("edgesplit_agent_plan_switches", "Plans applied (switched to)", registry=r)
        self.plan_refusals = Counter("edgesplit_agent_plan_refusals", "Plans refused, by status code of the reason",
                                     ["code"], registry=r)
        # every known series exists from the start (at 0), so rate() alerts can fire on the first event; the
        # per-frame series are kept by label value: labels() per frame took a lock and a lookup each (issue 14)
        self.frames_by = {where: self.frames.labels(where) for where in WHERE}
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason)
        self.stage_by = {stage: self.stage_seconds.labels(stage) for stage in STAGES}
        for code in ERROR_CODES:
            self.plan_refusals.labels(code)
        for reason in ("no_progress", "probe_unanswered", "keepalive"):
            self.stream_deaths.labels("worker", reason)
        self.stream_deaths.labels("planner", "keepalive")

    def stream_died(self, reason: str, endpoint: str = "worker") -> None:
        """A stream or connection ended for ``reason`` (runtime.wire.stream.StreamMetrics)."""
        self.stream_deaths.labels(endpoint, reason).inc()
