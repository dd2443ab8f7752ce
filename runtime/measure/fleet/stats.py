"""What a loader process counts, mergeable across processes (plain dicts and lists: picklable)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from runtime.daemon.planner_client import retry_after_seconds

DETAIL_CHARS = 100  # of an error's message, in Stats.error_details
MAX_DETAILS = 64  # distinct (replica, RPC, code, message) kept per loader process


@dataclass
class Stats:
    registered: int = 0
    register_seconds: list[float] = field(default_factory=list)  # each successful RegisterAgent call
    first_register: float = math.inf  # monotonic (system-wide on Linux, so comparable across processes)
    last_register: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)  # "RPC CODE" -> count
    # "rK RPC CODE: details" -> count (K: the replica the call went to; details cut to DETAIL_CHARS)
    error_details: Counter[str] = field(default_factory=Counter)
    retry_after: int = 0  # RESOURCE_EXHAUSTED answers that carried retry-after-ms (honoured)
    retry_after_seconds: float = 0.0  # total time waited for them
    telemetry_sent: int = 0
    telemetry_acked: int = 0  # TelemetryAck.received summed over the streams that closed cleanly
    telemetry_streams: int = 0  # streams opened
    plans: int = 0  # plans received (RegisterAgent replies and WatchPlan pushes with a new version)
    watch_opens: int = 0
    steps: int = 0  # bandwidth steps made in the measured phase
    step_to_push: list[float] = field(default_factory=list)  # seconds from the step's report to its new plan
    step_to_created: list[float] = field(default_factory=list)  # ... to the plan's created_unix (the planner's side)
    steps_missed: int = 0  # no new plan before the next step, the push timeout or the end
    missed_by: Counter[str] = field(default_factory=Counter)  # "board-K down|up" -> missed steps
    cpu_seconds: float = 0.0  # this loader process's own CPU (getrusage)
    wait_seconds: float = 0.0  # its threads' time runnable but waiting for a CPU (schedstat)
    loop_lag: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, how late a 100 ms timer fired)
    # with replicas: agents whose session broke and that registered again (on the next replica)
    reattach_started: list[float] = field(default_factory=list)  # monotonic time each noticed its session broke
    reattached: list[tuple[float, int, int]] = field(default_factory=list)  # (monotonic, plan version before, after)
    # (monotonic sent, replied) of each successful re-registration call: kill -> sent is the loader's
    # side (noticing the broken session, the back-off, its own loop), sent -> replied the survivor's
    reattach_calls: list[tuple[float, float]] = field(default_factory=list)
    reattach_failed: list[tuple[str, float]] = field(default_factory=list)  # (code, seconds) of failed attempts
    profile_resent: int = 0  # re-attaches by profile hash the replica did not hold: the document sent after all

    def error(self, rpc: str, e: BaseException, replica: int = 0) -> float:
        """Count one failed call (to replica number ``replica``); returns the retry-after it asked for (0.0: none)."""
        if isinstance(e, grpc.aio.AioRpcError):
            return self.status(rpc, e.code(), e.trailing_metadata(), e.details() or "", replica)
        self.errors[f"{rpc} {type(e).__name__}"] += 1
        self.detail(f"r{replica} {rpc} {type(e).__name__}", str(e))
        return 0.0

    def status(self, rpc: str, code: grpc.StatusCode, trailing: Any, details: str = "", replica: int = 0) -> float:
        """Count one call that ended with ``code``; returns the retry-after it asked for (0.0: none)."""
        self.errors[f"{rpc} {code.name}"] += 1
        self.detail(f"r{replica} {rpc} {code.name}", details)
        wait = retry_after_of(code, trailing)
        if wait:
            self.retry_after += 1
            self.retry_after_seconds += wait
        return wait

    def detail(self, key: str, details: str) -> None:
        """Count an error under its replica and its message (at most MAX_DETAILS distinct; then by code only)."""
        k = f"{key}: {' '.join(details.split())[:DETAIL_CHARS]}"
        if k not in self.error_details and len(self.error_details) >= MAX_DETAILS:
            k = f"{key}: (other messages)"
        self.error_details[k] += 1

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["errors"] = dict(self.errors)
        d["error_details"] = dict(self.error_details)
        d["missed_by"] = dict(self.missed_by)
        return d

    @staticmethod
    def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = Stats().to_dict()
        for p in parts:
            for k, v in p.items():
                if k in ("errors", "missed_by", "error_details"):
                    out[k] = dict(Counter(out[k]) + Counter(v))
                elif k == "first_register":
                    out[k] = min(out[k], v)
                elif k == "last_register":
                    out[k] = max(out[k], v)
                else:
                    out[k] = out[k] + v
        return out


def retry_after(e: grpc.aio.AioRpcError) -> float:
    """Seconds the server asked to wait (``retry-after-ms`` trailing metadata); 0.0 when it asked nothing."""
    return retry_after_of(e.code(), e.trailing_metadata())


def retry_after_of(code: grpc.StatusCode, trailing: Any) -> float:
    return retry_after_seconds(code, trailing)  # the real agent's reading (runtime.daemon.planner_client)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]
