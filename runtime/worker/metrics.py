"""Prometheus metrics of the edge worker (one registry per server instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.daemon.metrics_http import ERROR_CODES, STAGE_BUCKETS
from runtime.daemon.streams import SHED_REASONS
from runtime.wire.crl import register_metrics as register_crl_metrics
from runtime.wire.streamprobe import PROBE_RATE, PROBE_SIZE


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        register_crl_metrics(r)  # edgesplit_server_certificate_refused_total (runtime.wire.crl)
        self.frames = Counter("edgesplit_worker_frames", "Frames answered successfully, by Transfer Layer (tl=none without)",
                              ["model", "split", "tl"], registry=r)
        self.errors = Counter("edgesplit_worker_errors", "Frames or calls refused, by gRPC status code", ["code"], registry=r)
        self.received_bytes = Counter("edgesplit_worker_received_bytes", "Payload bytes received", registry=r)
        self.decode_seconds = Histogram("edgesplit_worker_decode_seconds", "Wire tensor decode time", buckets=STAGE_BUCKETS, registry=r)
        self.tail_seconds = Histogram("edgesplit_worker_tail_seconds", "Tail compute time", buckets=STAGE_BUCKETS, registry=r)
        self.queue_seconds = Histogram("edgesplit_worker_queue_seconds", "Time waiting for a free executor slot", buckets=STAGE_BUCKETS, registry=r)
        self.queue_depth = Gauge("edgesplit_worker_queue_depth", "Frames admitted and waiting for a slot", registry=r)
        self.inflight = Gauge("edgesplit_worker_inflight_frames", "Frames being computed", registry=r)
        self.loaded_tails = Gauge("edgesplit_worker_loaded_tails", "Tails held in memory", registry=r)
        self.streams = Gauge("edgesplit_worker_open_streams", "Open InferStream calls", registry=r)
        self.streams_shed = Counter("edgesplit_worker_streams_shed", "InferStream calls ended or refused by the stream "
                                    "limits, by reason (oldest_ended: a caller's newer stream took its place, "
                                    "--max-streams-per-caller; total_refused: --max-streams were open; probe_rate: "
                                    "over --max-stream-probes-per-second; probe_size: a stream probe over its size "
                                    "cap)", ["reason"], registry=r)
        self.stalled_streams = Counter("edgesplit_worker_stalled_streams", "Streams ended because a result waited "
                                       "--stalled-stream-seconds to be sent (the client stopped reading)", registry=r)
        # worker chaining (label next_tier: one of the configured --next-tier addresses, so bounded)
        self.forwarded = Counter("edgesplit_worker_forwarded_frames", "Chained frames whose slice output was forwarded "
                                 "to a next tier, by its outcome (gRPC status name)", ["next_tier", "code"], registry=r)
        self.forwarded_bytes = Counter("edgesplit_worker_forwarded_bytes", "Payload bytes sent to next tiers",
                                       ["next_tier"], registry=r)
        self.forward_encode_seconds = Histogram("edgesplit_worker_forward_encode_seconds",
                                                "Encoding a slice output for the next tier", buckets=STAGE_BUCKETS, registry=r)
        self.forward_seconds = Histogram("edgesplit_worker_forward_seconds", "Send to a next tier until its result",
                                         ["next_tier"], buckets=STAGE_BUCKETS, registry=r)
        self.next_tier_up = Gauge("edgesplit_worker_next_tier_stream_up", "1 while the stream to a next tier is open",
                                  ["next_tier"], registry=r)
        self.next_tier_opens = Counter("edgesplit_worker_next_tier_stream_opens", "Streams opened to a next tier",
                                       ["next_tier"], registry=r)
        self.stream_deaths = Counter("edgesplit_worker_stream_deaths", "Streams and connections that died, by endpoint "
                                     "(next_tier: a forward stream; planner: the registration's connection) and reason "
                                     "(runtime.wire.liveness; connection_lost: the planner connection left READY)",
                                     ["endpoint", "reason"], registry=r)
        self.probe_bytes = Counter("edgesplit_worker_probe_bytes", "Bandwidth probe payload bytes received from agents",
                                   registry=r)
        for reason in (*SHED_REASONS, PROBE_RATE, PROBE_SIZE):
            self.streams_shed.labels(reason)
        for code in ERROR_CODES:  # every series exists from the start, so rate() alerts can fire on the first error
            self.errors.labels(code)
