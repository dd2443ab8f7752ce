"""The Planner gRPC service's edge: each RPC checks its request (:mod:`planner.requests`), hands it
to the owner of what it changes, and builds the reply.

Registrations go to :class:`planner.state.PlannerState` (the registry) and
:class:`planner.replanner.RePlanner` (which decides a plan); telemetry and plan status to the
re-planner; WatchPlan streams come from :class:`planner.broadcaster.Broadcaster`; queries rank
through the re-planner without changing any plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping

import grpc

from planner import decide, probes, requests
from planner.broadcaster import Broadcaster
from planner.intake import RETRY_AFTER_HEADER, Gate, Shed
from planner.metrics import PlannerMetrics
from planner.owners import Owners, expire_workers, lease_of, remove_worker
from planner.replanner import RePlanner
from planner.state import PlannerState
from planner.streams import telemetry_slots
from runtime.contracts.errors import InvalidInput, PreconditionFailed
from runtime.contracts.profile import ProfileCache
from runtime.daemon.auth import current_identity
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

INLINE_PROFILE_CHARS = 2**20  # a profile up to this size is hashed on the event loop (a hit then needs no thread)
REGISTRATIONS_RUNNING = 8  # agent registrations doing their work at once (planner.intake.Gate)
REGISTRATIONS_WAITING = 2048  # ... and waiting their turn; beyond: RESOURCE_EXHAUSTED + retry-after-ms
REGISTRATIONS_PER_AGENT = 2  # registrations of one agent_id in flight at once (each holds its request: up to 16 MiB)
REGISTRATIONS_PER_WORKER = 2  # ... of one worker_id (its profiles are parsed in a thread; the others wait holding theirs)
REGISTRATION_RETRY_MS = 1000  # retry-after-ms of a registration refused for REGISTRATIONS_PER_AGENT / _PER_WORKER
# QueryPlan ranks at the query's exact figures in the search thread all decisions use: at most this many
# queries there at once, and waiting their turn; beyond: RESOURCE_EXHAUSTED + retry-after-ms
QUERIES_RUNNING = 1
QUERIES_WAITING = 8


class PlannerServicer(pb_grpc.PlannerServicer):
    """The planner's RPC edge: check the request, delegate, build the reply. Handlers raise
    EdgesplitError; the daemon scaffold's interceptor answers it with its status and counts it."""

    def __init__(self, state: PlannerState, replanner: RePlanner, broadcaster: Broadcaster,
                 metrics: PlannerMetrics) -> None:
        self.state = state
        self.replanner = replanner
        self.broadcaster = broadcaster
        self.metrics = metrics
        # who owns which worker/agent id (planner.owners): the hijack and spoofing guard
        self.owners = Owners(state.config.registration_ttl_seconds, state.config.max_ids_per_identity)
        # profiles parsed and checked once per content hash (agents of one board type share one)
        self.profiles: ProfileCache = state.profiles
        self._counted = (0, 0)  # profile cache hits and misses already in the metrics
        self.registrations = Gate(REGISTRATIONS_RUNNING, REGISTRATIONS_WAITING)
        # ReportTelemetry streams open (planner.streams): per authenticated agent, and in all
        self.telemetry_streams = telemetry_slots(state.config.max_agents, metrics.on_stream_shed("telemetry"))
        self._registering: dict[tuple[str, str], int] = {}  # (kind, id) -> its registrations in flight (_in_flight)
        self.queries = Gate(QUERIES_RUNNING, QUERIES_WAITING, "plan queries", "query again")
        # a burst of registrations (a replica's agents re-attaching) goes before the periodic pass and telemetry decisions
        replanner.registering = replanner.intake.yield_to = lambda: self.registrations.backlog > 0

    def _owned(self, kind: str, ident: str, context: grpc.aio.ServicerContext | None) -> None:
        """Refuse (PERMISSION_DENIED) a call about ``ident`` from anyone but its owner."""
        self.owners.check(kind, ident, current_identity(), lease_of(context))

    def expire(self) -> None:
        """Drop workers whose registration lapsed; their agents are re-planned onto live workers."""
        for old in expire_workers(self.state, self.state.config.registration_ttl_seconds):
            self.owners.release("worker", old.record.id)
            self.replanner.worker_registered({}, old)
        self.owners.expired("agent")  # lapsed agent bindings count for nothing: forget them (memory stays bounded)

    async def RegisterWorker(self, request: pb.RegisterWorkerRequest, context: grpc.aio.ServicerContext) -> pb.RegisterWorkerReply:
        if request.leaving:  # a clean shutdown, from the id's owner only: forget it, move its agents now
            wid = requests.check_id(request.worker_id, "worker_id")
            self.owners.claim("worker", wid, current_identity(), lease_of(context))
            self.owners.release("worker", wid)
            old = remove_worker(self.state, wid)
            if old is not None:
                logger.info("worker %s left", wid)
                self.replanner.worker_registered({}, old)
            return pb.RegisterWorkerReply()
        req = requests.check_worker_request(request, self.state.config)
        self.owners.claim("worker", req.worker_id, current_identity(), lease_of(context))  # before any heavy work
        with self._in_flight("worker", req.worker_id, REGISTRATIONS_PER_WORKER, context):
            try:
                return await self._register_worker(request, req)
            except BaseException:
                self._unclaim("worker", req.worker_id, self.state.workers)
                raise

    def _unclaim(self, kind: str, ident: str, held: Mapping[str, object]) -> None:
        """A registration refused (or cancelled) after its id was claimed: an id not registered here keeps no
        binding (else refused registrations under fresh ids and leases would grow the bindings without bound)."""
        if ident not in held:
            self.owners.release(kind, ident)

    async def _register_worker(self, request: pb.RegisterWorkerRequest,
                               req: requests.WorkerRequest) -> pb.RegisterWorkerReply:
        texts = list(request.profiles_json)
        held = self.state.workers.get(req.worker_id)
        if held is not None and list(held.record.profiles.values()) == texts:
            parsed = held.profiles  # the same documents (a periodic re-registration): nothing to parse
        else:  # parsing and checking profiles (up to max_message_bytes of JSON) runs off the event loop
            parsed = await asyncio.to_thread(requests.parse_worker_profiles, req.worker_id, texts, self.profiles)
            self._count_profiles()
        old = await self.state.register_worker(req, parsed, texts)
        self.replanner.worker_registered(parsed, old, req.worker_id)
        return pb.RegisterWorkerReply(profiles=len(parsed))

    async def RegisterAgent(self, request: pb.RegisterAgentRequest, context: grpc.aio.ServicerContext) -> pb.RegisterAgentReply:
        aid = requests.check_id(request.agent_id, "agent_id")
        self.owners.claim("agent", aid, current_identity(), lease_of(context))
        with self._in_flight("agent", aid, REGISTRATIONS_PER_AGENT, context):
            try:
                async with self.registrations.turn():
                    return await self._register_agent(request)
            except Shed as e:
                context.set_trailing_metadata(((RETRY_AFTER_HEADER, str(e.retry_after_ms)),))
                self._unclaim("agent", aid, self.state.agents)
                raise
            except BaseException:
                self._unclaim("agent", aid, self.state.agents)
                raise

    @contextlib.contextmanager
    def _in_flight(self, kind: str, ident: str, limit: int, context: grpc.aio.ServicerContext) -> Iterator[None]:
        """One more registration of ``kind`` ``ident`` in flight, at most ``limit`` (each holds its request, up to
        the 16 MiB message limit); beyond, Shed at once. The caller's own are in flight: its binding stays."""
        key = (kind, ident)
        n = self._registering.get(key, 0)
        if n >= limit:
            context.set_trailing_metadata(((RETRY_AFTER_HEADER, str(REGISTRATION_RETRY_MS)),))
            raise Shed(f"{n} registrations of {kind} {ident!r} are in flight, the most one {kind} may have; register "
                       f"again in {REGISTRATION_RETRY_MS} ms (trailing metadata {RETRY_AFTER_HEADER})", REGISTRATION_RETRY_MS)
        self._registering[key] = n + 1
        try:
            yield
        finally:
            left = self._registering.pop(key) - 1
            if left:
                self._registering[key] = left

    async def _register_agent(self, request: pb.RegisterAgentRequest) -> pb.RegisterAgentReply:
        text, key, seen = self._agent_profile(request)
        if seen:  # a profile seen before (by its text's hash or named by hash): no parsing
            req = requests.check_agent_request(request, self.profiles, text, key)
        else:  # parsing and checking a new profile runs off the loop
            req = await asyncio.to_thread(requests.check_agent_request, request, self.profiles, text, key)
        self._count_profiles()
        rec = self.state.agent_record(req, request)
        shared = self.profiles.shared(text, key)  # one copy of the text per board type, not per agent
        if key is not None:  # its hash travels with it: the store does not hash it again
            rec.hold_profile(shared, key.hex())
        else:
            rec.profile = shared
        plan = await self.replanner.register(rec, req.device)
        self.replanner.gc.check(len(self.state.agents))  # during a ramp: freeze often, keep full GC scans short
        st = self.state.agents.get(rec.id)
        if st is not None and st.written is not None:  # the registration is stored before it is answered
            await st.written
        return pb.RegisterAgentReply(plan=plan)

    def _agent_profile(self, request: pb.RegisterAgentRequest) -> tuple[str, bytes | None, bool]:
        """The agent's profile text, its cache key (hashed once, here; None above INLINE_PROFILE_CHARS)
        and whether this planner holds that content checked already. A profile named by ``profile_sha256`` (profile_json
        empty) must be one this planner parsed and checked itself: otherwise FAILED_PRECONDITION, and
        the agent sends the document. The hash names content only; it carries no agent's identity."""
        if request.profile_sha256:
            if request.profile_json:
                raise InvalidInput("send profile_json or profile_sha256, not both")
            named = request.profile_sha256
            if len(named) != 64 or named.strip("0123456789abcdef"):
                raise InvalidInput("profile_sha256 must be 64 lowercase hex digits (SHA-256 of profile_json's UTF-8 bytes)")
            key = bytes.fromhex(named)
            held = self.profiles.held(key)
            if held is None:
                raise PreconditionFailed(f"profile unknown: this planner holds no checked profile {named[:12]}...; "
                                         "send it in profile_json")
            return held[1], key, True
        text = request.profile_json
        if len(text) > INLINE_PROFILE_CHARS:
            return text, None, False
        key = ProfileCache.key(text)
        return text, key, self.profiles.peek(key) is not None

    def _count_profiles(self) -> None:
        hits, misses = self.profiles.hits, self.profiles.misses
        self.metrics.profile_cache.labels("hit").inc(hits - self._counted[0])
        self.metrics.profile_cache.labels("miss").inc(misses - self._counted[1])
        self._counted = (hits, misses)

    async def ReportTelemetry(self, request_iterator: AsyncIterator[pb.Telemetry], context: grpc.aio.ServicerContext) -> pb.TelemetryAck:
        """Each report is checked and recorded here; one that could change the plan queues a decision
        (planner.intake: coalesced per agent, refused RESOURCE_EXHAUSTED + retry-after-ms when full)."""
        with self.telemetry_streams.hold(current_identity(), context):
            return await self._telemetry(request_iterator, context)

    async def _telemetry(self, request_iterator: AsyncIterator[pb.Telemetry],
                         context: grpc.aio.ServicerContext) -> pb.TelemetryAck:
        received = 0
        intake = self.replanner.intake
        async for t in request_iterator:
            self._owned("agent", t.agent_id, context)
            st = self.state.agent(t.agent_id)
            received += 1
            self.metrics.telemetry.inc()
            bw, rtt = requests.check_telemetry(t)
            if intake.stale(t.sent_unix):
                continue  # counted; never acted on late
            try:
                intake.admit(st.record.id)
            except Shed as e:
                context.set_trailing_metadata(((RETRY_AFTER_HEADER, str(e.retry_after_ms)),))
                raise
            due = self.replanner.telemetry(st, t, bw, rtt)
            if st.record.id in intake:  # joins the decision queued (or, when due, decides once more after it)
                intake.coalesce(st, again=due)
            elif due:
                intake.offer(st)
        return pb.TelemetryAck(received=received)

    async def ReportPlanStatus(self, request: pb.PlanStatus, context: grpc.aio.ServicerContext) -> pb.PlanStatusAck:
        self._owned("agent", request.agent_id, context)
        st = self.state.agent(request.agent_id)
        requests.check_plan_status(request)
        await self.replanner.plan_status(st, request)
        return pb.PlanStatusAck()

    async def WatchPlan(self, request: pb.WatchPlanRequest, context: grpc.aio.ServicerContext) -> AsyncGenerator[pb.Plan, None]:
        self._owned("agent", request.agent_id, context)
        st = self.state.agent(request.agent_id)  # an unknown agent: NOT_FOUND, mapped by the daemon's interceptor
        # aclosing: the subscription ends with this stream, even when it is closed while waiting to send
        async with contextlib.aclosing(self.broadcaster.watch(request.agent_id, st.plan, request.known_version)) as plans:
            async for plan in plans:
                yield plan

    async def QueryPlan(self, request: pb.PlanQuery, context: grpc.aio.ServicerContext) -> pb.PlanQueryReply:
        if current_identity().authenticated:  # read-only: anonymous operators on a loopback planner may ask
            self._owned("agent", request.agent_id, context)
        st = self.state.agent(request.agent_id)
        top_n, bw, rtt = requests.check_query(request, self.state.config, st.device)
        record = dataclasses.replace(st.record, constraints=request.constraints) if request.HasField("constraints") else None
        try:
            async with self.queries.turn():
                ranked, seconds = await self.replanner.query(st, top_n, rtt, bw, record)
        except Shed as e:
            context.set_trailing_metadata(((RETRY_AFTER_HEADER, str(e.retry_after_ms)),))
            raise
        reply = pb.PlanQueryReply(decision_seconds=seconds)
        for i, r in enumerate(ranked):
            reply.candidates.append(decide.to_plan(st.record, st.device, r,
                                                   f"candidate {i + 1} of {len(ranked)}: {r.config.describe()}"))
        return reply

    async def ListProbeTargets(self, request: pb.ProbeTargetsRequest,
                               context: grpc.aio.ServicerContext) -> pb.ProbeTargetsReply:
        self._owned("agent", request.agent_id, context)  # its workers and measured links are the agent's own
        return probes.probe_targets(self.state, self.state.agent(request.agent_id))

    async def ListAgents(self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext) -> pb.ListAgentsReply:
        reply = pb.ListAgentsReply()
        now = time.time()
        for aid, st in sorted(self.state.agents.items()):
            info = pb.AgentInfo(agent_id=aid, model_id=st.record.model, refused_version=st.record.refused_version,
                                refused_message=st.record.refused_message, telemetry_age_seconds=-1.0)
            if st.plan is not None:
                info.plan.CopyFrom(st.plan)
            lk = st.links.get(st.plan.worker_id) if st.plan is not None and st.plan.worker_id else None
            if lk is not None:
                info.bandwidth_bytes_per_second, info.rtt_seconds = lk.bandwidth_bytes_per_second, lk.rtt_seconds
            if st.links:
                info.telemetry_age_seconds = max(0.0, now - max(x.updated_unix for x in st.links.values()))
            reply.agents.append(info)
        return reply
