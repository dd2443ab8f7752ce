"""Planner daemon configuration (defaults < TOML [planner] < EDGESPLIT_PLANNER_* < flags)."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.contracts.config import field
from runtime.contracts.errors import InvalidInput
from runtime.daemon.tracing import TracingSettings
from runtime.wire.security import SecuritySettings
from runtime.wire.transport import TransportOptions


@dataclass(frozen=True)
class PlannerConfig(SecuritySettings, TracingSettings):  # security: runtime.wire.security; trace_*: runtime.daemon.tracing
    listen: str = field("127.0.0.1:50061", "gRPC address to listen on (HOST:PORT; port 0 picks a free one)")
    db: str = field("edgesplit-planner.sqlite", "SQLite file holding workers, agents, links and the plan history (used when store is empty)")
    store: str = field("", "the planner's database: postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (shared by planner replicas), sqlite:///PATH or a plain path; empty: the SQLite file 'db'")
    store_flush_seconds: float = field(1.0, "link estimates, heartbeats and device speeds are written in one transaction this often (a crash loses at most this much of them); plans and registrations are written at once")
    replica_id: str = field("", "this planner's name among replicas sharing one PostgreSQL store (leases name it); empty: HOSTNAME-PID-RANDOM")
    lease_seconds: float = field(5.0, "with a shared (PostgreSQL) store: an agent stays attached to the replica holding its lease, renewed every store_flush_seconds; a lease not renewed this long (the replica died) lets another replica take the agent over")
    metrics_port: int = field(-1, "Prometheus HTTP port (0 picks a free one, -1 disables)")
    metrics_host: str = field("127.0.0.1", "address the metrics endpoint binds to")
    default_rtt_seconds: float = field(0.005, "link RTT assumed with default_bandwidth_bytes_per_second for a link no telemetry measured (a measured bandwidth with no measured RTT is unknown, never offloaded to)")
    default_bandwidth_bytes_per_second: float = field(0.0, "link bandwidth assumed for a link no telemetry measured (0: none; an unmeasured link is unknown and never offloaded to; an assumption is never stored as a measurement)")
    link_ttl_seconds: float = field(600.0, "a link estimate older than this (by its last sample, also one read back from the store after a restart) is unknown again")
    # Worker-to-worker links (an edge worker forwarding to a cloud worker) carry no telemetry: agents
    # measure only their own link, so a chained plan's edge -> cloud hop is costed with these.
    worker_link_rtt_seconds: float = field(0.010, "RTT assumed between a worker and the next-tier worker it forwards to")
    worker_link_bandwidth_bytes_per_second: float = field(12_500_000.0, "bandwidth assumed between a worker and the next-tier worker it forwards to (100 Mbit/s)")
    switch_gain: float = field(0.10, "relative predicted gain over the running plan needed to switch (0.10 = 10 %)")
    switch_min_gain_seconds: float = field(0.002, "absolute predicted gain per frame needed to switch, in seconds")
    hold_seconds: float = field(3.0, "the gain must hold this long, continuously, before the plan changes")
    compute_telemetry: bool = field(True, "scale the device profile's block times by the board's measured compute (telemetry head times over the profile's, smoothed); false: plan with the profile as measured")
    replan_interval_seconds: float = field(0.5, "how often agents with fresh telemetry or a pending switch are re-planned")
    telemetry_max_rate_hz: float = field(10.0, "per agent, telemetry messages acted on per second (the rest only update the link estimate)")
    top_n: int = field(5, "candidates QueryPlan returns when the query sets no top_n")
    max_top_n: int = field(50, "largest top_n a QueryPlan may ask for")
    max_profiles_per_worker: int = field(64, "models one worker may register profiles for")
    max_agents: int = field(10_000, "registered agents accepted; beyond this RegisterAgent answers RESOURCE_EXHAUSTED")
    max_workers: int = field(1_000, "registered workers accepted; beyond this RegisterWorker answers RESOURCE_EXHAUSTED")
    registration_ttl_seconds: float = field(90.0, "a worker not registered again (every 30 s) for this long is dropped and its id freed; an agent's id is freed after this long without a call")
    max_ids_per_identity: int = field(64, "worker and agent ids one caller (certificate, token or lease) may hold at once")
    # A fleet (issue 15): what one planner process keeps and how it sheds load
    profile_cache_size: int = field(256, "profiles kept parsed and checked, by the SHA-256 of their JSON (agents of one board type share one); a document not held is parsed and checked again")
    rank_cache_size: int = field(4096, "rankings kept for reuse by agents with the same profiles, constraints and link band")
    rank_band: float = field(0.05, "links whose bandwidths lie within this relative step of one another (on a grid anchored at powers of ten) are ranked at the same figure and share one ranking; 0: every figure exactly")
    rank_rtt_quantum_seconds: float = field(0.0005, "RTTs are ranked rounded to a multiple of this (0: exactly); see rank_band")
    telemetry_max_pending: int = field(2000, "agents whose telemetry awaits a decision; while this many wait, a report from any other agent is refused RESOURCE_EXHAUSTED with trailing metadata retry-after-ms")
    telemetry_max_age_seconds: float = field(30.0, "a telemetry report sent (its sent_unix, the agent's clock) longer ago than this is dropped and counted, never acted on late (0: no limit)")
    replan_batch: int = field(256, "agents one periodic pass decides at most; the rest wait for the next pass (a changed worker's agents are spread over passes)")
    gc_freeze_agents: int = field(1000, "from this many agents on, the planner moves its long-lived objects out of the garbage collector's scans (gc.freeze) each time the agents grew by a tenth (holding automatic full collections off while they grow), so a full collection does not stall the event loop for 0.1 s and more at 10,000 agents (0: never)")
    parallel_tile_factors: tuple[str, ...] = field((), "tile-compute factors files (python -m runtime.tools.dpfp_tilecal, measured inside a worker's quota), one per model: the parallel stages the planner pushes price tiles by them as 'edgesplit plan --parallel-tile-factors' does; a model without one is priced by area (checked at start-up, at most 64 files of 4 MiB)")
    parallel_halo: bool = field(False, "the parallel stages the planner pushes may exchange halos between workers instead of gathering between blocks, as 'edgesplit plan --parallel-halo' does (the agent's workers need --halo-peer; an agent with --no-parallel-halo runs such a stage with gather and scatter)")
    parallel_halo_round_ms: float = field(0.0, "with parallel_halo: fixed cost of one block's worker-to-worker fetch round beyond its RTT and bytes, in ms, as 'edgesplit plan --parallel-halo-round-ms' (0: not costed; at most 60000)")
    include_return: bool = field(True, "model the result's trip back from the worker in predicted latency")
    max_message_bytes: int = field(16 * 2**20, "gRPC message size limit, both directions (profiles travel in RegisterWorker)")
    grace_seconds: float = field(5.0, "on SIGTERM, how long calls in flight may take to finish")
    port_file: str = field("", "write the bound port to this file once serving (for supervisors and tests)")

    def __post_init__(self) -> None:
        checks = [
            (self.default_rtt_seconds >= 0, "default_rtt_seconds must be >= 0"),
            (self.default_bandwidth_bytes_per_second >= 0, "default_bandwidth_bytes_per_second must be >= 0"),
            (self.link_ttl_seconds > 0, "link_ttl_seconds must be > 0"),
            (self.worker_link_rtt_seconds >= 0, "worker_link_rtt_seconds must be >= 0"),
            (self.worker_link_bandwidth_bytes_per_second > 0, "worker_link_bandwidth_bytes_per_second must be > 0"),
            (self.switch_gain >= 0, "switch_gain must be >= 0 (0.10 = switch on a 10 % predicted gain)"),
            (self.switch_min_gain_seconds >= 0, "switch_min_gain_seconds must be >= 0"),
            (self.hold_seconds >= 0, "hold_seconds must be >= 0"),
            (self.replan_interval_seconds > 0, "replan_interval_seconds must be > 0"),
            (self.telemetry_max_rate_hz > 0, "telemetry_max_rate_hz must be > 0"),
            (1 <= self.top_n <= self.max_top_n, "top_n must be between 1 and max_top_n"),
            (self.max_profiles_per_worker >= 1, "max_profiles_per_worker must be >= 1"),
            (self.max_agents >= 1 and self.max_workers >= 1, "max_agents and max_workers must be >= 1"),
            (self.grace_seconds >= 0, "grace_seconds must be >= 0"),
            (self.store_flush_seconds > 0, "store_flush_seconds must be > 0"),
            (self.lease_seconds >= 2 * self.store_flush_seconds or not self.store.startswith(("postgresql:", "postgres:")),
             "lease_seconds must be at least twice store_flush_seconds (leases are renewed at each flush)"),
            (len(self.replica_id) <= 128, "replica_id must be at most 128 characters"),
            (self.registration_ttl_seconds > 0, "registration_ttl_seconds must be > 0"),
            (self.max_ids_per_identity >= 1, "max_ids_per_identity must be >= 1"),
            (self.profile_cache_size >= 1 and self.rank_cache_size >= 1, "profile_cache_size and rank_cache_size must be >= 1"),
            (0 <= self.rank_band < 1, "rank_band must be in [0, 1) (0.05: bandwidths within ~5 % share a ranking)"),
            (self.rank_rtt_quantum_seconds >= 0, "rank_rtt_quantum_seconds must be >= 0"),
            (self.telemetry_max_pending >= 1, "telemetry_max_pending must be >= 1"),
            (self.telemetry_max_age_seconds >= 0, "telemetry_max_age_seconds must be >= 0 (0: no limit)"),
            (self.replan_batch >= 1, "replan_batch must be >= 1"),
            (self.gc_freeze_agents >= 0, "gc_freeze_agents must be >= 0 (0: never)"),
            (0 <= self.parallel_halo_round_ms < 60_000, "parallel_halo_round_ms must be in [0, 60000) ms"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(f"planner configuration: {message}")

    def store_location(self) -> str:
        """Where the store is: ``store`` if set, else the SQLite file ``db``."""
        return self.store or self.db

    def transport(self) -> TransportOptions:
        return TransportOptions(max_message_bytes=self.max_message_bytes, security=self.security())
