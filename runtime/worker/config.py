"""Edge worker configuration (defaults < TOML [worker] < EDGESPLIT_WORKER_* < flags)."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.contracts.config import field
from runtime.contracts.errors import InvalidInput
from runtime.contracts.tiers import EDGE
from runtime.daemon.tracing import TracingSettings
from runtime.wire.limits import DEFAULT_MAX_BYTES
from runtime.wire.security import SecuritySettings
from runtime.wire.transport import MiB, TransportOptions

FORWARD_CHUNK_BYTES = MiB  # the most payload bytes per message a worker forwards to its next tier


@dataclass(frozen=True)
class WorkerConfig(SecuritySettings, TracingSettings):  # security: runtime.wire.security; trace_*: runtime.daemon.tracing
    listen: str = field("127.0.0.1:50051", "gRPC address to listen on (HOST:PORT; port 0 picks a free one)")
    metrics_port: int = field(-1, "Prometheus HTTP port (0 picks a free one, -1 disables)")
    metrics_host: str = field("127.0.0.1", "address the metrics endpoint binds to")
    models: tuple[str, ...] = field((), "user models this worker may serve, as path/to/file.py:factory or .pt2")
    serve_models: tuple[str, ...] = field((), "models callers may name (Prepare, frames); others are PERMISSION_DENIED. 'all' = every bundled and configured model (default: the models --model/--preload/--tl/--profiles name; every bundled one when none)")
    preload: tuple[str, ...] = field((), "MODEL or MODEL@SPLIT tails to load at start instead of on first use")
    tls: tuple[str, ...] = field((), "Transfer Layer artifacts (.json written by 'edgesplit tl train') whose decoders this worker serves")
    max_concurrency: int = field(1, "frames computed at once (tail executor threads)")
    max_queue: int = field(8, "frames allowed to wait for a free slot; beyond this RESOURCE_EXHAUSTED at once")
    inline_compute_seconds: float = field(0.0, "run a frame's decode and tail on the event loop's thread (no executor hand-off and back) while it is the only frame admitted, at most one InferStream is open and its tail's last compute, per batch element times the frame's batch, took at most this long; meanwhile another caller's call waits behind it (2-4 such computes with frames back to back), and so do the agents' probes, whose late-frame check reads a slow answer as a slow link. 0 (the default) turns it off; e.g. 0.05 for a worker serving one agent whose frames are not timed")
    torch_threads: int = field(0, "torch intra-op threads per tail (0 = torch default)")
    max_tensor_bytes: int = field(DEFAULT_MAX_BYTES, "largest decoded tensor or payload accepted, in bytes")
    max_batch: int = field(8, "largest batch dimension of a frame (a bigger one is INVALID_ARGUMENT)")
    max_loaded_models: int = field(4, "models held in memory at once; a frame or Prepare naming another is RESOURCE_EXHAUSTED")
    max_reassembly_bytes: int = field(256 * 2**20, "bytes held in incomplete chunked frames over all streams; beyond, RESOURCE_EXHAUSTED")
    reassembly_timeout_seconds: float = field(10.0, "an incomplete chunked frame older than this is dropped (DEADLINE_EXCEEDED)")
    max_streams: int = field(1024, "InferStream calls open at once, every caller together; beyond, a new one is RESOURCE_EXHAUSTED at once")
    max_streams_per_caller: int = field(4, "InferStream calls one authenticated agent or worker keeps open; a newer one ends its oldest RESOURCE_EXHAUSTED (an agent holds one per worker, two while reconnecting)")
    max_stream_results: int = field(32, "results one stream may hold computed but not yet sent; beyond, the worker stops reading it")
    max_stream_probes_per_second: float = field(20.0, "stream liveness probes (StreamProbe) one InferStream may send a second, as many at once; beyond, the stream ends RESOURCE_EXHAUSTED (an agent sends ~2 a second idle; 0: none answered, and none advertised)")
    stalled_stream_seconds: float = field(30.0, "a result the client has not taken within this long (it stopped reading) ends its stream RESOURCE_EXHAUSTED")
    max_message_bytes: int = field(8 * 2**20, "gRPC message size limit, both directions")
    grace_seconds: float = field(10.0, "on SIGTERM, how long frames in flight may take to finish")
    port_file: str = field("", "write the bound port to this file once serving (for supervisors and tests)")
    planner: str = field("", "planner address HOST:PORT to register with (empty: none)")
    worker_id: str = field("", "this worker's name at the planner (default: the host name)")
    advertise: str = field("", "address agents should dial, HOST:PORT (default: the listen address, 0.0.0.0 -> FQDN)")
    tier: str = field(EDGE, "tier this worker serves at the planner: edge or cloud")
    profiles: tuple[str, ...] = field((), "profiles of the models served, measured here ('edgesplit profile --role edge')")
    planner_refresh_seconds: float = field(30.0, "register again this often (a restarted planner learns the worker back)")
    # worker chaining: run a middle slice of a frame and forward its output to a next-tier worker
    next_tiers: tuple[str, ...] = field((), "workers this one may forward chained frames to, HOST:PORT matched exactly (the first when a frame names none); others are refused PERMISSION_DENIED")
    halo_peers: tuple[str, ...] = field((), "workers this one may fetch halo parts from (DPFP halo exchange, Tiles.FetchRegion), as HOST:PORT matched exactly or HOST for any port of that host; a tile request naming another is refused PERMISSION_DENIED and its coordinator falls back to gather and scatter. Empty (the default): no halo fetches, so an agent cannot make this worker dial an address of its choosing with the worker's credentials")
    forward_codec: str = field("raw+lz4", "codec of tensors forwarded to a next tier when the frame's hop names none")
    forward_deadline_seconds: float = field(2.0, "a forwarded frame with no next-tier result after this long is answered DEADLINE_EXCEEDED")
    forward_connect_timeout_seconds: float = field(1.0, "how long to wait for a next tier when opening the stream to it")
    forward_reconnect_seconds: float = field(1.0, "first back-off before reopening a failed stream to a next tier (doubles to 2 s, jittered)")

    def __post_init__(self) -> None:
        from runtime.wire.codec import get_codec  # torch: only when a config is built, not for --help

        get_codec(self.forward_codec)  # InvalidInput with the valid names ("ans" needs a TL: not for forwarding)
        if not 0 <= self.max_stream_probes_per_second <= 1000:
            raise InvalidInput(f"max_stream_probes_per_second must be in [0, 1000], got {self.max_stream_probes_per_second!r}")
        for name in ("stalled_stream_seconds", "forward_deadline_seconds", "forward_connect_timeout_seconds", "forward_reconnect_seconds"):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.inline_compute_seconds >= 0:
            raise InvalidInput(f"inline_compute_seconds must be >= 0, got {self.inline_compute_seconds!r}")
        for name in ("max_streams", "max_streams_per_caller"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if any(not t.strip() for t in self.next_tiers):
            raise InvalidInput("next_tiers holds an empty address; give each as HOST:PORT")
        if any(not t.strip() for t in self.halo_peers):
            raise InvalidInput("halo_peers holds an empty address; give each as HOST:PORT or HOST")

    def transport(self) -> TransportOptions:
        # chunk_bytes: what it forwards to a next tier goes in messages of 1 MiB at most (it keeps no link estimate
        # to size them by, as the agent does: runtime.wire.transport.link_chunk_bytes)
        return TransportOptions(max_message_bytes=self.max_message_bytes, chunk_bytes=FORWARD_CHUNK_BYTES,
                                security=self.security())
