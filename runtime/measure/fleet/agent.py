"""One simulated agent: what a real agent (runtime.agent.planner_link) says to the planner, without a model.

``RegisterAgent`` with its board type's device profile (a RESOURCE_EXHAUSTED answer's
``retry-after-ms`` is waited out; other failures back off 0.5 s doubling to 5 s), then a
``WatchPlan`` stream (each new plan answered with ``ReportPlanStatus`` applied, as the agent does)
and one ``ReportTelemetry`` client stream that carries a report every heartbeat
(``telemetry_interval_seconds``) and one at once after each bandwidth step. A stepping agent
toggles its bandwidth between the high and the low level every ``step_period_seconds`` in the
measured phase; the time from that report to the first pushed plan that differs from the one in
force at the step is its step-to-push latency. Every call carries the agent's own
``edgesplit-lease`` metadata (a planner without authentication binds the id to it, as it does for
a real agent process).

With planner replicas, each agent starts on one (agent i on replica i mod N, as a Service spreads
connections) and, as the real agent (runtime.agent.planner_link) does when its session breaks
(the replica died: UNAVAILABLE; another took it: FAILED_PRECONDITION; it forgot it: NOT_FOUND),
waits its back-off (0.5 s, doubling to 5 s, +-50 %) and registers again on a new connection,
which the Service gives to another replica: here the next one in turn. The registration's
reply is when it is re-attached and re-planned (the planner decides at registration).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import secrets
import time
from dataclasses import dataclass

import grpc

from runtime.daemon.planner_client import LEASE
from runtime.measure.fleet.options import FleetOptions
from runtime.measure.fleet.stats import Stats
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc


@functools.lru_cache(maxsize=64)
def profile_sha256(text: str) -> str:
    """RegisterAgentRequest.profile_sha256 of a board's document (one per board type)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


LEASE_KEY = LEASE[0][0]  # the header runtime.daemon.planner_client sends
STREAM_SECONDS = 300.0  # deadline of each WatchPlan / ReportTelemetry stream, as the real agent's default
BACKOFF_INITIAL, BACKOFF_MAX = 0.5, 5.0
# a session's end that sends a real agent to register again (with replicas: on another replica)
REATTACH_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})


@dataclass
class Phase:
    """The measured phase, set once every loader has registered its agents (monotonic times)."""

    start: float = float("inf")
    end: float = float("inf")
    stopping: bool = False


@dataclass
class Shared:
    """What every agent of one loader process shares."""

    options: FleetOptions
    stats: Stats
    phase: Phase
    model: str  # the model id agents register
    digest: str  # its weights digest (as in the profiles)


class SimAgent:
    def __init__(self, agent_id: str, board: tuple[int, str], stubs: list[ppb_grpc.PlannerStub], shared: Shared,
                 stepping: bool, rng: random.Random):
        """``board``: (board type, its device profile JSON); ``stubs``: one per planner replica, the first
        is where it starts."""
        self.id = agent_id
        self.board = board[0]
        self.stubs = stubs
        self.stub = stubs[0]
        self.session = 0  # registrations after the first (a broken session: registered again)
        self._reattaching = asyncio.Lock()
        self.options = shared.options
        self.stats = shared.stats
        self.phase = shared.phase
        self.stepping = stepping
        self.rng = rng
        self.metadata = ((LEASE_KEY, secrets.token_urlsafe(24)),)
        self.request = ppb.RegisterAgentRequest(agent_id=agent_id, model_id=shared.model, model_digest=shared.digest,
                                                profile_json=board[1])
        self.light = ppb.RegisterAgentRequest(agent_id=agent_id, model_id=shared.model, model_digest=shared.digest,
                                              profile_sha256=profile_sha256(board[1]))  # a re-attach's request
        self.version = 0
        self.plan_key: tuple[str, str, str] = ("", "", "")
        self.high = True  # the bandwidth level it reports now
        self.pending: float | None = None  # monotonic time of an unanswered step report
        self.pending_unix = 0.0  # and its wall-clock time (against Plan.created_unix)
        self.pending_key: tuple[str, str, str] = ("", "", "")
        self.step_due = False  # a step waits for its report
        self.report_now = asyncio.Event()  # a step: report at once

    # -- registration ---------------------------------------------------------------------------

    async def register(self, deadline: float) -> bool:
        backoff = BACKOFF_INITIAL
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                reply = await self.stub.RegisterAgent(self.request, timeout=self.options.rpc_timeout_seconds,
                                                      metadata=self.metadata)
            except grpc.aio.AioRpcError as e:
                wait = self.stats.error("RegisterAgent", e, self.stubs.index(self.stub))
                await asyncio.sleep(wait or backoff * (0.5 + self.rng.random()))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            t1 = time.monotonic()
            s = self.stats
            s.registered += 1
            s.register_seconds.append(t1 - t0)
            s.first_register, s.last_register = min(s.first_register, t0), max(s.last_register, t1)
            if reply.plan.version:
                self._on_plan(reply.plan)
            return True
        return False

    # -- plans ----------------------------------------------------------------------------------

    def _on_plan(self, plan: ppb.Plan) -> bool:
        if plan.version <= self.version:
            return False
        self.version = plan.version
        self.plan_key = (plan.worker_id, plan.split_id, plan.codec)
        self.stats.plans += 1
        if self.pending is not None and self.plan_key != self.pending_key:
            self.stats.step_to_push.append(time.monotonic() - self.pending)
            if plan.created_unix > 0:  # the planner's clock: the same machine's
                self.stats.step_to_created.append(plan.created_unix - self.pending_unix)
            self.pending = None
        return True

    # -- replicas: a broken session registers again, on the next replica --------------------------

    def _broken(self, code: grpc.StatusCode | None) -> bool:
        return len(self.stubs) > 1 and code in REATTACH_CODES and not self.phase.stopping

    async def reattach(self, session: int) -> None:
        """The session opened as ``session`` broke: register again (once, whichever stream saw it first)."""
        async with self._reattaching:
            if self.session != session or self.phase.stopping:
                return  # the other stream's call did it meanwhile
            self.stats.reattach_started.append(time.monotonic())
            before, backoff, k = self.version, BACKOFF_INITIAL, self.stubs.index(self.stub)
            while not self.phase.stopping:
                await asyncio.sleep(backoff * (0.5 + self.rng.random()))  # the real agent's wait before a new session
                k = (k + 1) % len(self.stubs)
                stub = self.stubs[k]
                try:  # a new connection; the streams move to it once registered there, as in a real agent's session
                    sent = time.monotonic()
                    reply = await self._register_light(stub)
                except grpc.aio.AioRpcError as e:
                    self.stats.reattach_failed.append((f"r{k} {e.code().name}", time.monotonic() - sent))
                    asked = self.stats.error("RegisterAgent", e, k)  # a retry-after (the planner's registration gate)
                    backoff = asked / 0.5 if asked else min(backoff * 2, BACKOFF_MAX)  # waited at least as asked
                    continue
                self.stub, self.session = stub, self.session + 1
                self.stats.reattached.append((time.monotonic(), before, reply.plan.version))
                self.stats.reattach_calls.append((sent, time.monotonic()))
                if reply.plan.version:
                    self._on_plan(reply.plan)
                return

    async def _register_light(self, stub: ppb_grpc.PlannerStub) -> ppb.RegisterAgentReply:
        """A re-registration names the profile by its SHA-256 (as runtime.agent.planner_link does); a
        planner that does not hold it checked answers FAILED_PRECONDITION and gets the document."""
        reply: ppb.RegisterAgentReply  # the generated stub is unannotated
        try:
            reply = await stub.RegisterAgent(self.light, timeout=self.options.rpc_timeout_seconds, metadata=self.metadata)
            return reply
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION or "profile unknown" not in (e.details() or ""):
                raise
            self.stats.profile_resent += 1
        reply = await stub.RegisterAgent(self.request, timeout=self.options.rpc_timeout_seconds, metadata=self.metadata)
        return reply

    async def watch(self) -> None:
        backoff = BACKOFF_INITIAL
        while not self.phase.stopping:
            session, k = self.session, self.stubs.index(self.stub)
            call = self.stub.WatchPlan(ppb.WatchPlanRequest(agent_id=self.id, known_version=self.version),
                                       timeout=STREAM_SECONDS, metadata=self.metadata)
            self.stats.watch_opens += 1
            try:
                async for plan in call:
                    if self._on_plan(plan):
                        await self._status(plan.version)
                    backoff = BACKOFF_INITIAL
                wait = 0.0  # the stream's deadline or the planner ended it: reopen
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                if self._broken(e.code()):
                    self.stats.error("WatchPlan", e, k)
                    await self.reattach(session)
                    continue
                wait = self.stats.error("WatchPlan", e, k) or backoff * (0.5 + self.rng.random())
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as e:  # counted, the stream reopens
                wait = await self._ended("WatchPlan", call, e, k) or backoff
            finally:
                call.cancel()
            if not self.phase.stopping:
                await asyncio.sleep(wait)

    async def _ended(self, rpc: str, call: grpc.aio.Call, e: Exception, k: int) -> float:
        """Count a stream (on replica ``k``) that failed with ``e``, by the call's own status when it has
        ended (its retry-after, 0.0 when none); the details say which of the two was counted."""
        if call.done():
            with contextlib.suppress(Exception):
                code = await call.code()
                if code != grpc.StatusCode.OK:
                    return self.stats.status(rpc, code, await call.trailing_metadata(),
                                             f"(call status) {await call.details()}", k)
        if isinstance(e, grpc.aio.AioRpcError):
            return self.stats.status(rpc, e.code(), e.trailing_metadata(), f"(raised) {e.details()}", k)
        return self.stats.error(rpc, e, k)

    async def _status(self, version: int) -> None:
        try:
            await self.stub.ReportPlanStatus(ppb.PlanStatus(agent_id=self.id, version=version, applied=True),
                                             timeout=self.options.rpc_timeout_seconds, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            self.stats.error("ReportPlanStatus", e, self.stubs.index(self.stub))

    # -- telemetry ------------------------------------------------------------------------------

    def _message(self, worker: str) -> ppb.Telemetry:
        o = self.options
        level = o.high_bandwidth if self.high else o.low_bandwidth
        bandwidth = level * (1.0 + o.jitter * (2 * self.rng.random() - 1))
        return ppb.Telemetry(agent_id=self.id, worker=worker, bandwidth_bytes_per_second=bandwidth,
                             rtt_seconds=o.rtt_seconds, plan_version=self.version, sent_unix=time.time(),
                             bandwidth_age_seconds=0.1, bandwidth_samples=20)

    async def telemetry(self, worker: str) -> None:
        """Report every heartbeat and at once after a step, until the run stops; then close and count the ack."""
        backoff = BACKOFF_INITIAL
        while not self.phase.stopping:
            session, k = self.session, self.stubs.index(self.stub)
            call = self.stub.ReportTelemetry(timeout=STREAM_SECONDS, metadata=self.metadata)
            self.stats.telemetry_streams += 1
            try:
                await self._report(call, worker)
                await asyncio.wait_for(call.done_writing(), self.options.rpc_timeout_seconds)
                ack = await asyncio.wait_for(call, self.options.rpc_timeout_seconds)
                self.stats.telemetry_acked += ack.received
                wait = 0.0
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not self.phase.stopping:
                    continue
                # a write after a refusal may fail INTERNAL (grpc/grpc#36066): the call's own status counts
                wait = await self._ended("ReportTelemetry", call, e, k) or backoff * (0.5 + self.rng.random())
                backoff = min(backoff * 2, BACKOFF_MAX)
            except asyncio.TimeoutError:
                self.stats.errors["ReportTelemetry client-timeout"] += 1
                self.stats.detail(f"r{k} ReportTelemetry client-timeout", "")
                wait = backoff
            except Exception as e:  # a write on a call the server ended (InvalidStateError): its status says why
                wait = await self._ended("ReportTelemetry", call, e, k) or backoff
            finally:
                call.cancel()
            if self._broken(await _code(call)) or (len(self.stubs) > 1 and self._reattaching.locked()):
                # a broken session, or one whose other stream is re-attaching it now (this one may have
                # ended INTERNAL, no reason to move by itself): follow it, not a retry on the dead replica
                await self.reattach(session)
                continue
            if not self.phase.stopping:
                await asyncio.sleep(wait)

    async def _report(self, call: grpc.aio.StreamUnaryCall, worker: str) -> None:
        """Write reports until the run stops, the stream's time is up or the call ends. A call that ended
        meanwhile (its planner died: UNAVAILABLE) wakes this at once and is not written to (a write that
        core refuses ends the call INTERNAL "Internal error from Core" in grpc aio; with a replica killed
        under 10,000 agents most of its telemetry streams still end so: runtime/measure/results/fleet.md)."""
        interval = self.options.telemetry_interval_seconds
        opened = time.monotonic()
        next_due = opened  # the first report goes at once (an agent just registered)
        call.add_done_callback(lambda _: self.report_now.set())
        while not self.phase.stopping and time.monotonic() - opened < STREAM_SECONDS - 2 * interval:
            delay = next_due - time.monotonic()
            if delay > 0 and not call.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.report_now.wait(), delay)
            if self.phase.stopping or call.done():
                return  # ended: the caller reads its status
            self.report_now.clear()
            if self.step_due:  # the step's clock starts as its report is written
                self.step_due, self.pending, self.pending_unix = False, time.monotonic(), time.time()
            await asyncio.wait_for(call.write(self._message(worker)), self.options.rpc_timeout_seconds)
            self.stats.telemetry_sent += 1
            next_due = time.monotonic() + interval

    async def steps(self) -> None:
        """A stepping agent's bandwidth steps, in the measured phase only."""
        o = self.options
        while time.monotonic() < self.phase.start and not self.phase.stopping:
            await asyncio.sleep(min(1.0, max(0.0, self.phase.start - time.monotonic())))
        at = self.phase.start + self.rng.random() * o.step_period_seconds
        while not self.phase.stopping:
            if at >= self.phase.end:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if self.phase.stopping:
                return
            if self.pending is not None or self.step_due:
                self._missed()
            self.high = not self.high
            self.stats.steps += 1
            self.pending, self.pending_key, self.step_due = None, self.plan_key, True
            self.report_now.set()
            at += o.step_period_seconds

    def finish(self) -> None:
        """The run ended: a step still unanswered after the push timeout counts as missed."""
        if self.pending is not None and time.monotonic() - self.pending >= self.options.push_timeout_seconds:
            self._missed()

    def _missed(self) -> None:
        self.stats.steps_missed += 1
        self.stats.missed_by[f"board-{self.board} {'up' if self.high else 'down'}"] += 1


async def _code(call: grpc.aio.Call) -> grpc.StatusCode | None:
    """The status of a call that has ended (None while it runs)."""
    if not call.done():
        return None
    with contextlib.suppress(Exception):
        return await call.code()
    return None
