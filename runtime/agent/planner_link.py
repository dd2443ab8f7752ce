"""The agent's side of the planner: register, follow the plan, report measurements.

One task per link. Each connection ("session"):

1. ``RegisterAgent`` with the device profile, model id/digest, allowed workers, TLs held and
   constraints; the plan in the reply (version > 0) is applied at once.
2. ``WatchPlan`` stays open; each new plan goes to :meth:`Agent.apply_plan` (which switches at
   a frame boundary or refuses and keeps the old plan) and is answered with ``ReportPlanStatus``
   (applied, or refused with the reason). A chained plan's route (``Plan.end_split`` and
   ``next_hops``: which later worker runs which slice) goes to ``apply_plan`` with it; a plan
   names its whole route, so one without a route ends a chain given on the command line. A route
   the agent cannot apply (a Transfer Layer on a worker-to-worker hop, a slice that does not
   exist, a next tier the worker refuses at Prepare) refuses the plan and the last good one stays.
3. ``ReportTelemetry`` carries a message when the link moved and at every heartbeat
   (:class:`runtime.agent.telemetry_report.ReportCadence`): at once (a new session's first report, or the
   bandwidth estimate leaving +-25 % of the last reported figure or the running plan's band), and
   otherwise once per ``telemetry_heartbeat_seconds`` (``edgesplit agent``'s default 10 s; 0: one
   every ``telemetry_interval_seconds``, moved or not), never more than one per
   ``telemetry_interval_seconds`` (the bound holds across reconnects too). A message holds the
   smoothed bandwidth, an RTT probe made for it, device stage medians and the frame count since
   the last message, the plan version in effect. A planner that sheds the stream
   (RESOURCE_EXHAUSTED) is left alone for its ``retry-after-ms``, then hears the link again on a
   new stream; the session (registration, plan stream) stays.

When the planner cannot be reached or a stream breaks, the agent keeps its last plan and keeps
serving frames; the link waits (0.5 s doubling to 30 s by default, reset after a successful
registration) and starts a new session on a new channel, registering again first (by profile hash:
runtime.agent.planner_register; whatever ended the last session, an INTERNAL on a telemetry stream
included, no stream is reopened on the old channel); a silent partition ends the session by
keep-alive (1 s + 0.8 s ping timeout, widened after a ping lost behind frames). Every RPC has a deadline: unary
calls ``rpc_timeout``; the two long-lived streams ``stream_seconds``, after which they are
reopened within the same session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from runtime.agent import planner_register
from runtime.agent.fallbacks import FallbackSwitcher
from runtime.agent.plan import pushed_tl_id
from runtime.agent.prediction import Prediction
from runtime.agent.prediction import line as prediction_line
from runtime.agent.prober import ProbeOptions, Prober
from runtime.agent.telemetry_report import HEARTBEAT_SECONDS, ReportCadence, link_report, wire_reports
from runtime.contracts.errors import DeadlineExceeded, EdgesplitError, InvalidInput, Overloaded, Unavailable
from runtime.daemon.planner_client import PlannerClient, PlannerClientOptions
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.wire.asyncutil import Backoff, cancel_and_wait
from runtime.wire.chain import Hop
from runtime.wire.liveness import death_kind
from runtime.wire.transport import TransportOptions

logger = logging.getLogger(__name__)

MAX_WORKER_IDS = 256  # worker addresses whose ids the link remembers (for telemetry under a local plan)
MAX_PREDICTIONS = 256  # predicted latencies kept for result lines (a plan and its fallbacks each)


@dataclass(frozen=True)
class PlannerLinkOptions:
    """How one agent talks to its planner (``edgesplit agent --planner ...``)."""

    # HOST:PORT of the planner
    planner_address: str
    # a runtime.contracts.profile.Profile or the path of its JSON (loaded and checked when the link is built)
    profile: Any
    # the id the agent registers under; "" takes the agent's own
    agent_id: str = ""
    # worker ids the planner may place this agent on; empty: any it knows
    workers: tuple[str, ...] = ()
    # the agent's constraints: a planner_pb2.Constraints, a mapping of its fields, or None for none
    constraints: Any = None
    # shortest time between two telemetry messages (across reconnects too)
    telemetry_interval_seconds: float = 1.0
    # a telemetry message at least this often (compute samples, a link that did not move); between
    # heartbeats one only when the link estimate moves out of its band (runtime.agent.telemetry_report.ReportCadence).
    # 0: a message every telemetry_interval_seconds, moved or not (the cadence before issue 15); default
    # runtime.agent.telemetry_report.HEARTBEAT_SECONDS (10 s), as the agent command's
    telemetry_heartbeat_seconds: float = HEARTBEAT_SECONDS
    # Transfer Layers the agent holds; None: the loaded one and those found in the agent's tl_dir
    tl_ids: tuple[str, ...] | None = None
    # deadline of each unary call, each telemetry write and each stream's ack
    rpc_timeout: float = 5.0
    # seconds to wait for the planner's channel to be ready before a session counts as failed
    connect_timeout: float = 5.0
    # first wait after a failed session; doubles per failure, back to this after a registration
    backoff_initial: float = 0.5
    # longest wait between sessions
    backoff_max: float = 30.0
    # life of each WatchPlan / ReportTelemetry stream; then it is reopened in the same session
    stream_seconds: float = 300.0
    # deadline of the RTT probe made for each telemetry message
    probe_timeout: float = 1.0
    # gRPC message size and keep-alive limits of the planner channel
    transport: TransportOptions = field(default_factory=TransportOptions)
    # active probes of links no frame measures (runtime.agent.prober); budget_fraction 0 disables them
    probe: ProbeOptions = field(default_factory=ProbeOptions)
    # seconds between two ListProbeTargets calls (the workers this agent may be placed on)
    probe_targets_seconds: float = 5.0

    def client_options(self) -> PlannerClientOptions:
        return PlannerClientOptions(self.planner_address, self.transport, self.connect_timeout, self.rpc_timeout,
                                    self.stream_seconds)


class PlannerLink:
    """Keeps one agent registered with the planner, its plan current and its telemetry flowing."""

    def __init__(self, agent, options: PlannerLinkOptions):
        """The profile is loaded and checked now, so a bad file is an error at start, not a silent
        link failure later."""
        from runtime.contracts.profile import Profile, load

        profile = options.profile
        if not options.planner_address:
            raise InvalidInput("planner address is empty; give HOST:PORT of the planner")
        interval, heartbeat = options.telemetry_interval_seconds, options.telemetry_heartbeat_seconds
        if not interval > 0 or not math.isfinite(interval):
            raise InvalidInput(f"telemetry interval must be a positive number of seconds, got {interval!r}")
        if not heartbeat >= 0 or not math.isfinite(heartbeat):
            raise InvalidInput(f"telemetry heartbeat must be a number of seconds >= 0 (0: every interval), got "
                               f"{heartbeat!r}")
        if isinstance(profile, (str, os.PathLike)):
            if not str(profile):
                raise InvalidInput("a planner needs the device profile: set 'profile' to the JSON written by "
                                   "'edgesplit profile' on this board")
            profile = load(Path(profile))
        if not isinstance(profile, Profile):
            raise InvalidInput(f"profile must be a runtime.contracts.profile.Profile or a path, not {type(profile).__name__}")
        if profile.model != agent.loaded.name:
            logger.warning("device profile is for model %r, the agent runs %r", profile.model, agent.loaded.name)
        if profile.model_digest and profile.model_digest != agent.loaded.digest:
            logger.warning("device profile was measured on weights %s, the agent has %s", profile.model_digest,
                           agent.loaded.digest)
        self.agent = agent
        link = getattr(agent, "link", None)
        if link is not None:  # this link's result lines re-cost each frame from the figures before it
            link.keep_history = True  # (runtime.agent.prediction.History; off in an agent with no planner)
        self.options = options
        self.address = options.planner_address
        self.profile_json = profile.to_json()
        self.profile_sha256 = hashlib.sha256(self.profile_json.encode()).hexdigest()  # re-registrations name it so
        self.agent_id = options.agent_id or agent.agent_id
        constraints = options.constraints
        if constraints is None:
            constraints = ppb.Constraints()
        elif not isinstance(constraints, ppb.Constraints):
            constraints = ppb.Constraints(**dict(constraints))
        self.constraints = constraints
        self.interval = float(interval)
        self._backoff = Backoff(options.backoff_initial, max(options.backoff_initial, options.backoff_max))
        # state, for logs, tests and `status`-style introspection
        self.connected = False  # registered and streams open
        self.registrations = 0
        self.telemetry_sent = 0
        self.telemetry_shed = 0  # telemetry streams the planner ended RESOURCE_EXHAUSTED (waited out, then reopened)
        self.session_deaths = 0  # registered sessions that ended in an error (a partition, a planner gone)
        # the planner channel's keep-alive ping timeout: TransportOptions.control_keepalive_timeout_ms (0.8 s),
        # doubled after each ping lost behind frames (_widen_if_queued)
        self.ping_timeout_ms = options.transport.control_keepalive_timeout_ms
        self._edge_frames_at_death: float | None = None
        self.plans_applied = 0
        self.plans_refused = 0
        self.last_error = ""
        self._worker_id = ""  # worker id of the plan in effect (telemetry is about that link)
        self._worker_ids: dict[str, str] = {}  # worker address -> id, from the plans applied
        self.cadence = ReportCadence(heartbeat or self.interval, self.interval)  # when a message goes (and why)
        self._moved = asyncio.Event()  # a new bandwidth figure: the cadence looks again
        self._task: asyncio.Task | None = None
        self.prober = Prober(agent, options.probe)
        self.switcher = FallbackSwitcher(agent)  # the plan's fallback table (runtime.agent.fallbacks)
        # (plan version, split, worker address) -> the planner's prediction, for result lines (re-costed at the link now)
        self.predictions: OrderedDict[tuple[int, str, str], Prediction] = OrderedDict()
        agent.link.listeners.append(self.switcher.on_estimate)
        agent.link.listeners.append(self._on_estimate)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the link in the background; returns at once (the agent serves frames meanwhile)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"planner-link-{self.agent_id}")

    async def close(self) -> None:
        """Stop the link: cancel its task, close its channel. The agent keeps its current plan."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self.prober.close()
        for listener in (self.switcher.on_estimate, self._on_estimate):
            if listener in self.agent.link.listeners:
                self.agent.link.listeners.remove(listener)
        await self.switcher.close()

    # -- sessions ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._widen_if_queued()
            transport = dataclasses.replace(self.options.transport, control_keepalive_timeout_ms=self.ping_timeout_ms)
            planner = PlannerClient(dataclasses.replace(self.options.client_options(), transport=transport))
            try:
                await planner.connect()
                # once registered, by the profile's SHA-256 (runtime.agent.planner_register); any failure of the
                # session below, INTERNAL included, ends it: the next one is a new channel and registers first
                reply = await planner_register.register(planner, self._register_request, self.registrations > 0)
                self.registrations += 1
                self.connected = True
                self._backoff.reset()
                logger.info("registered with planner %s as %s (plan v%d offered)", self.address, self.agent_id,
                            reply.plan.version)
                if reply.plan.version:
                    await self._on_plan(planner, reply.plan)
                await self._session(planner)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # network trouble or a planner bug: keep the plan, retry later
                self.last_error = _describe(e)
                if self.connected:  # a session that was up died (keep-alive: <= 1.8 s after the last byte)
                    self._died(self.last_error)
                delay = self._backoff.next()
                logger.warning("planner %s: %s; keeping plan v%d, retrying in %.1fs", self.address, self.last_error,
                               self.agent.plan_version, delay)
            else:
                delay = self._backoff.next()
            finally:
                self.connected = False
                await planner.close()
            await asyncio.sleep(delay)

    def _died(self, reason: str) -> None:
        self.session_deaths += 1
        kind = death_kind(reason)
        died = getattr(getattr(self.agent, "metrics", None), "stream_died", None)
        if died is not None:
            died(kind, "planner")
        if kind == "keepalive":  # was it a partition, or a ping queued behind frames? (_widen_if_queued)
            self._edge_frames_at_death = self._edge_frames()

    def _edge_frames(self) -> float:
        registry = getattr(getattr(self.agent, "metrics", None), "registry", None)
        value = registry.get_sample_value("edgesplit_agent_frames_total", {"where": "edge"}) if registry else None
        return value or 0.0

    def _widen_if_queued(self) -> None:
        """After a keep-alive death, before the next session: if edge results kept arriving since, the link
        was not partitioned, the planner's ping waited behind frames on the board's uplink (the planner is
        usually reached over the same link; 400 KB at 1.6 Mbit/s holds a ping 2 s). The next sessions wait
        twice as long for a ping (up to TransportOptions.control_backstop_timeout_ms), so a busy slow uplink
        does not end a session at each frame; a partition is then noticed later (at most 1 s + 10 s). A
        keep-alive death with no edge result since (a partition, or no frames queued) halves it back."""
        at_death, self._edge_frames_at_death = self._edge_frames_at_death, None
        if at_death is not None and self._edge_frames() <= at_death:
            self.ping_timeout_ms = max(self.options.transport.control_keepalive_timeout_ms, self.ping_timeout_ms // 2)
        elif at_death is not None:
            wider = min(2 * self.ping_timeout_ms, max(self.ping_timeout_ms, self.options.transport.control_backstop_timeout_ms))
            if wider > self.ping_timeout_ms:
                logger.warning("planner %s: a keep-alive ping went unanswered while frames still got through (a "
                               "busy uplink, not a partition); the planner channel now waits %d ms for a ping",
                               self.address, wider)
                self.ping_timeout_ms = wider

    def _register_request(self, light: bool = False) -> ppb.RegisterAgentRequest:
        return planner_register.register_request(self.agent, self.agent_id, self.profile_json, self.profile_sha256,
                                                 self.options.workers, planner_register.held_tls(self.agent,
                                                                                                 self.options.tl_ids),
                                                 self.constraints, light)

    async def _session(self, planner: PlannerClient) -> None:
        """Watch plans and send telemetry until either stream fails (then raise)."""
        tasks = {asyncio.create_task(self._watch(planner)), asyncio.create_task(self._telemetry(planner)),
                 asyncio.create_task(self._probe_links(planner))}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
            raise Unavailable("planner session ended")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- plans -------------------------------------------------------------------------------

    async def _watch(self, planner: PlannerClient) -> None:
        while True:
            request = ppb.WatchPlanRequest(agent_id=self.agent_id, known_version=self.agent.plan_version)
            try:
                async for plan in planner.watch_plan(request):
                    await self._on_plan(planner, plan)
            except DeadlineExceeded:
                continue  # the stream's own deadline: reopen it
            raise Unavailable("the planner ended the plan stream")

    async def _on_plan(self, planner: PlannerClient, plan: ppb.Plan) -> None:
        if plan.version == self.agent.plan_version:
            return  # already in effect (the watch starts with the current plan)
        applied, message = True, ""
        try:
            if plan.agent_id and plan.agent_id != self.agent_id:
                raise InvalidInput(f"plan v{plan.version} is for agent {plan.agent_id!r}, not {self.agent_id!r}")
            # An empty address with no worker id means "run locally"; with a worker id, keep the current worker.
            address = plan.worker_address or ("" if not plan.worker_id else None)
            # A local plan names no codec (nothing crosses a link): keep the current one.
            await self.agent.apply_plan(plan.split_id or plan.split_index, plan.codec or self.agent.codec,
                                        pushed_tl_id(plan.tl_id),
                                        plan.version, address, model_id=plan.model_id, end_split=plan.end_split,
                                        next_hops=_route(plan))
            if getattr(self.agent, "parallel", None) is not None:  # its parallel stage (RFS/DPFP), or none
                await self.agent.parallel.apply(plan)
            self._worker_id = plan.worker_id
            self._remember(plan.worker_address, plan.worker_id)
            self.switcher.set_plan(plan)
            self.cadence.set_bands(plan.band_worker_address, tuple(b.min_bandwidth_bytes_per_second
                                                                   for b in plan.fallbacks))
            self._predict(plan)
            self.plans_applied += 1
        except EdgesplitError as e:
            applied, message = False, str(e)
            self.plans_refused += 1
        except Exception as e:  # a bug while building the plan: refuse it rather than drop the session
            logger.exception("applying plan v%d failed", plan.version)
            applied, message = False, f"plan v{plan.version} refused: internal error: {type(e).__name__}: {e}"
            self.plans_refused += 1
        await planner.report_plan_status(ppb.PlanStatus(agent_id=self.agent_id, version=plan.version,
                                                        applied=applied, message=message))

    # -- telemetry ---------------------------------------------------------------------------

    async def _telemetry(self, planner: PlannerClient) -> None:
        self.cadence.reported = None  # a new session (perhaps a restarted planner) hears the link at once
        while True:
            stream = planner.telemetry_stream()
            opened = time.monotonic()
            try:
                while time.monotonic() - opened < self.options.stream_seconds:
                    reason = await self._next_report(opened + self.options.stream_seconds)
                    if not reason:
                        break
                    message = await self._telemetry_message()
                    await stream.write(message)
                    self.cadence.sent(self._main_link(self.agent.link.clock())[1], message.bandwidth_bytes_per_second,
                                      reason, message.frames)
                    self.telemetry_sent += 1
                await stream.finish()  # the ack; then a fresh stream
            except Overloaded as e:  # shed: wait as asked, then report again on a new stream (same session)
                self.telemetry_shed += 1
                wait = stream.retry_after or self.interval
                logger.info("planner %s shed telemetry (%s); reporting again in %.2f s", self.address, e, wait)
                self.cadence.reported = None  # the refused report is sent again
                await asyncio.sleep(wait)
            finally:
                stream.cancel()

    def _on_estimate(self, key: str, bytes_per_second: float) -> None:
        """A new bandwidth figure (LinkEstimator listener, on the event loop): the cadence looks again."""
        self._moved.set()

    def _link_now(self) -> tuple[str, float, int]:
        """(address, bandwidth estimate, frames since the last message) a message would report now
        (bandwidth 0.0: unknown)."""
        link = self.agent.link
        address = self._main_link(link.clock())[1]
        est = link.links.get(address) if address else None
        return address, est.bandwidth.value if est is not None else 0.0, link.frames_pending

    async def _next_report(self, until: float) -> str:
        """Wait until a message is due (its reason), or "" at ``until`` (the stream's end)."""
        while True:
            reason = self.cadence.due(*self._link_now())
            if reason:
                return reason
            # look again at least every interval: frames that start running notify no listener
            wait = min(self.cadence.wait_seconds(*self._link_now()), self.interval, until - time.monotonic())
            if wait <= 0:
                return ""
            self._moved.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._moved.wait(), wait)

    async def _probe_links(self, planner: PlannerClient) -> None:
        """Probe the links of the workers the planner may place this agent on (runtime.agent.prober);
        never ends the session: a planner without ListProbeTargets only stops the probes."""
        if self.options.probe.budget_fraction <= 0:
            await asyncio.Event().wait()
        targets: list[str] = []
        listed = -math.inf
        while True:
            if time.monotonic() - listed >= self.options.probe_targets_seconds:
                listed = time.monotonic()
                try:
                    reply = await planner.call("ListProbeTargets", ppb.ProbeTargetsRequest(agent_id=self.agent_id))
                except EdgesplitError as e:
                    if e.code == grpc.StatusCode.UNIMPLEMENTED:  # an older planner: frames measure, nothing else
                        logger.info("planner %s lists no probe targets; links are measured by frames only", self.address)
                        await asyncio.Event().wait()
                    logger.debug("probe targets: %s; the last list stays", e)  # transient: keep probing
                else:
                    targets = []
                    for t in reply.targets[: self.options.probe.max_targets]:
                        targets.append(t.address)
                        self._remember(t.address, t.worker_id)
            await self.prober.round(targets)
            await asyncio.sleep(min(self.interval, self.options.probe.min_interval_seconds))

    def _predict(self, plan: ppb.Plan) -> None:
        """The plan's prediction, and each fallback's (at its band's grid bandwidth) for a configuration
        the plan itself is not: the plan's own figure, at the measured bandwidth, is never replaced."""
        self.predictions[(plan.version, plan.split_id, plan.worker_address)] = Prediction.of(plan)
        for p in (b.plan for b in plan.fallbacks):
            self.predictions.setdefault((plan.version, p.split_id, p.worker_address), Prediction.of(p))
        while len(self.predictions) > MAX_PREDICTIONS:
            self.predictions.popitem(last=False)

    def predicted(self, result: Any) -> float:
        """The planner's predicted latency for the configuration ``result`` (a FrameResult) ran under
        (0.0: none known, e.g. a plan from the command line)."""
        p = self.predictions.get((result.plan_version, result.split, result.worker))
        agent = getattr(self, "agent", None)  # its link's estimate now (runtime.agent.prediction)
        if p is None or agent is None:
            return 0.0 if p is None else p.seconds
        return prediction_line(p, agent.link, result)  # its own bytes, the link and the board then, their queues

    def _remember(self, address: str, worker_id: str) -> None:
        if not (address and worker_id):
            return
        self._worker_ids.pop(address, None)
        self._worker_ids[address] = worker_id
        if len(self._worker_ids) > MAX_WORKER_IDS:  # the oldest mapping goes
            del self._worker_ids[next(iter(self._worker_ids))]

    def _main_link(self, now: float) -> tuple[str, str]:
        """(worker id, address) of the link a message is about: the plan's; under a local plan the
        link measured last ("" and "" when none is known)."""
        link = self.agent.link
        address = self.agent.active.worker
        worker = self._worker_id if address else ""
        if not address and (fresh := link.links.freshest(now)) is not None:
            address = fresh[0]
            worker = self._worker_ids.get(address, address)  # the planner resolves an address too
        return worker, address

    async def _telemetry_message(self) -> ppb.Telemetry:
        """About the link the plan uses; under a local plan, about the link measured last (per link:
        figures of one worker are never reported under another's id)."""
        await self.agent.probe_rtt(self.options.probe_timeout)
        link = self.agent.link
        stages, frames = link.take_report(self.agent.telemetry_plan_version)
        now = link.clock()
        worker, address = self._main_link(now)
        main = link_report(worker or address, link.links.get(address) if address else None, now)
        others = [link_report(self._worker_ids.get(key, key), link.links.get(key), now) for key in link.links
                  if key and key != address][:MAX_WORKER_IDS]
        return ppb.Telemetry(agent_id=self.agent_id, worker=main.worker,
                             bandwidth_bytes_per_second=main.bandwidth_bytes_per_second,
                             bandwidth_age_seconds=main.bandwidth_age_seconds, bandwidth_samples=main.bandwidth_samples,
                             rtt_seconds=main.rtt_seconds, stage_seconds=stages, other_links=[o for o in others if
                                                                                              o.bandwidth_samples],
                             frames=frames, plan_version=self.agent.telemetry_plan_version, sent_unix=time.time(),
                             wire=wire_reports(link))


def _route(plan: ppb.Plan) -> list[Hop]:
    """The hops after the plan's worker, as the agent's chain takes them. InvalidInput for one it cannot run."""
    hops = []
    for i, h in enumerate(plan.next_hops, 1):
        if h.tl_id:
            raise InvalidInput(f"plan v{plan.version} refused: next hop {i} ({h.worker_id or h.address}) names Transfer "
                               f"Layer {h.tl_id!r}, but workers forward with a codec only")
        if not h.address:
            raise InvalidInput(f"plan v{plan.version} refused: next hop {i} ({h.worker_id or '?'}) has no address")
        hops.append(Hop(h.address, h.end_split, h.codec))
    return hops


def _describe(e: BaseException) -> str:
    if isinstance(e, EdgesplitError):
        return f"{e.code.name}: {e}"
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}"
