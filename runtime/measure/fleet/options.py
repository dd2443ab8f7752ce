"""What one fleet run does (``edgesplit bench-planner-fleet`` flags)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from runtime.contracts.errors import InvalidInput

MB = 1_000_000.0


@dataclass(frozen=True)
class FleetOptions:
    """One run: how many agents, how they report, how long it lasts, where the results go."""

    agents: int = 1000  # simulated agents
    board_types: int = 10  # distinct device profiles (the bundled one, block times scaled by 2x, 3x, ...)
    workers: int = 3  # simulated workers (RegisterWorker only; no agent dials them)
    worker_reregister_seconds: float = 30.0  # workers register again this often, as real workers do
    telemetry_interval_seconds: float = 10.0  # an agent's heartbeat report; a bandwidth step is reported at once
    step_fraction: float = 0.10  # share of agents that step their bandwidth down and up
    step_period_seconds: float = 20.0  # a stepping agent toggles its bandwidth this often (random phase)
    high_bandwidth: float = 12.5 * MB  # bytes/s a steady agent reports (100 Mbit/s), +-jitter
    low_bandwidth: float = 0.025 * MB  # bytes/s after a step down (200 kbit/s)
    jitter: float = 0.05  # relative noise on each reported bandwidth (inside any band)
    rtt_seconds: float = 0.004  # RTT every agent reports
    duration_seconds: float = 60.0  # measured phase (after all agents registered and settled)
    settle_seconds: float = 5.0  # after the last registration, before the measured phase
    register_timeout_seconds: float = 300.0  # the registration phase ends here even if agents are missing
    register_concurrency: int = 32  # RegisterAgent calls in flight per loader process
    push_timeout_seconds: float = 15.0  # a step with no new plan within this long counts as missed
    loaders: int = 0  # loader processes; 0: one per 2,500 agents (at least 1, at most 8)
    channels: int = 8  # gRPC channels (TCP connections) per loader process
    health_interval_seconds: float = 0.25  # health checks during the run
    rpc_timeout_seconds: float = 10.0  # deadline of each unary call
    hold_seconds: float = 0.0  # the planner's --hold-seconds (0: step-to-push measures the planner, not its hysteresis)
    planner_args: tuple[str, ...] = ()  # extra flags for 'edgesplit planner serve'
    replicas: int = 1  # planner processes on one shared store (agents spread over them, as by a Service)
    store: str = ""  # their store: a postgresql:// URL, or "postgresql" for a throw-away server; "": SQLite each
    kill_after_seconds: float = 0.0  # SIGKILL the first replica this long into the measured phase (0: none)
    cprofile: str = ""  # the planner's cProfile file (python -m pstats FILE); "" none
    gc_pauses: bool = False  # time the planner's oldest-generation garbage collections (in the results)
    pin: bool = True  # planner on one core, loaders on the others (os.sched_setaffinity) where there are >= 2
    out_dir: str = "runtime/measure/results"  # folder for the JSON and markdown
    name: str = "fleet"  # file stem of the results
    seed: int = 1  # random phases and jitter
    command: str = ""  # the command line, recorded with the results

    def __post_init__(self) -> None:
        positive = ("telemetry_interval_seconds", "step_period_seconds", "high_bandwidth", "low_bandwidth",
                    "duration_seconds", "register_timeout_seconds", "push_timeout_seconds", "health_interval_seconds",
                    "rpc_timeout_seconds", "worker_reregister_seconds")
        for name in positive:
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise InvalidInput(f"{name.replace('_', '-')} must be a positive number, got {v!r}")
        if not 1 <= self.agents <= 100_000:
            raise InvalidInput(f"agents must be 1..100000, got {self.agents}")
        if not 1 <= self.board_types <= 100 or not 1 <= self.workers <= 64:
            raise InvalidInput("board-types must be 1..100 and workers 1..64")
        if not 0 <= self.step_fraction <= 1 or not 0 <= self.jitter < 0.5:
            raise InvalidInput("step-fraction must be in [0, 1] and jitter in [0, 0.5)")
        if self.settle_seconds < 0 or self.hold_seconds < 0 or self.rtt_seconds < 0:
            raise InvalidInput("settle-seconds, hold-seconds and rtt-seconds must be >= 0")
        if not 1 <= self.replicas <= 8:
            raise InvalidInput(f"replicas must be 1..8, got {self.replicas}")
        if self.replicas > 1 and not self.store.startswith("postgres"):
            raise InvalidInput("replicas share one store: give --store postgresql (a throw-away server) or a "
                               "postgresql:// URL")
        if not (math.isfinite(self.kill_after_seconds) and 0 <= self.kill_after_seconds < self.duration_seconds):
            raise InvalidInput("kill-after must be >= 0 and shorter than the measured phase (--duration)")
        if self.kill_after_seconds and self.replicas < 2:
            raise InvalidInput("kill-after needs --replicas 2 or more (a survivor to re-attach to)")
        if not 0 <= self.loaders <= 32 or not 1 <= self.channels <= 256 or not 1 <= self.register_concurrency <= 1024:
            raise InvalidInput("loaders must be 0..32, channels 1..256, register-concurrency 1..1024")

    @property
    def loader_count(self) -> int:
        return self.loaders or max(1, min(8, math.ceil(self.agents / 2500)))


def quick(options: FleetOptions) -> FleetOptions:
    """CI mode (<= 60 s on this machine): 200 agents, 15 s measured, steps every 5 s."""
    return replace(options, agents=200, duration_seconds=15.0, settle_seconds=2.0, step_period_seconds=5.0,
                   step_fraction=0.1, register_timeout_seconds=40.0, name="fleet_quick")
