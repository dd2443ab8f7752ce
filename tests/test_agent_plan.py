"""Plans on the agent: atomic switches at frame boundaries, refusals, and the planner link.

Real workers (subprocesses on loopback) serve the tiny user model; the planner is a fake
in-process servicer, so the test controls exactly which plans arrive and when.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import grpc
import pytest
import torch
from conftest import REPO, TINY_NET, free_port
from polling import until

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.planner_link import PlannerLink, PlannerLinkOptions
from runtime.agent.sources import open_source
from runtime.contracts.errors import InvalidInput, NotFound, PreconditionFailed, Unavailable
from runtime.contracts.profile import Block, Profile
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.transfer.artifact import save_tl
from runtime.transfer.layers import TransferLayer
from runtime.wire.codec import get_codec

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

TOL = {"raw": 1e-5, "raw+lz4": 1e-5, "fp16": 2e-2, "fp16+lz4": 2e-2}  # atol = rtol per codec


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    return load_model(str(REPO / TINY_NET))


@pytest.fixture(scope="module")
def frames(loaded):
    return [f.tensor for f in open_source(loaded.spec, "synthetic", 16)]


@pytest.fixture(scope="module")
def expected(loaded, frames):
    with torch.inference_mode():
        return [loaded.full(x) for x in frames]


@pytest.fixture(scope="module")
def tl_dir(loaded, tmp_path_factory):
    """A parameter-free reference TL for split "stem" (ids resolve here)."""
    d = tmp_path_factory.mktemp("tls")
    sp = loaded.split("stem")
    tl_id, path = save_tl(TransferLayer("reference", sp.out_shape), loaded, sp, d)
    return d, tl_id, path


@pytest.fixture(scope="module")
def workers(start_worker, tl_dir):
    """Two workers of the tiny model: A without TLs, B holding the "stem" TL. Addresses."""
    common = ("--model", TINY_NET, "--torch-threads", "1", "--max-queue", "64")
    _, pa = start_worker(*common)
    _, pb = start_worker(*common, "--tl", str(tl_dir[2]))
    return f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"


def _profile(loaded) -> Profile:
    return Profile(machine="test-board", role="device", model=loaded.name, model_digest=loaded.digest,
                   blocks=(Block(0, "stem", 0.001, 32768),), input_bytes=49152)


def _check_output(r, expected) -> None:
    tol = TOL[r.codec] if r.where == "edge" else 1e-5
    assert torch.allclose(r.output, expected, atol=tol, rtol=tol), (r.seq, r.where, r.codec, r.split)


class Pump:
    """Frames in a loop, ``window`` at a time; records (frame index, version when it started, result)."""

    def __init__(self, agent: Agent, frames, window: int = 3):
        self.agent, self.frames, self.window = agent, frames, window
        self.results: list = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        await asyncio.wait_for(self.task, 60)

    async def _run(self):
        sem = asyncio.Semaphore(self.window)
        tasks, i = set(), 0

        async def one(k):
            try:
                v = self.agent.plan_version  # the frame takes its plan in the same step (no await between)
                r = await self.agent.infer(self.frames[k])
                self.results.append((k, v, r))
            finally:
                sem.release()

        while not self.stop.is_set():
            await sem.acquire()
            t = asyncio.create_task(one(i % len(self.frames)))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            i += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)

    def check(self, expected, where: str | None = "edge"):
        seqs = sorted(r.seq for _, _, r in self.results)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a frame was lost or duplicated"
        for k, v, r in self.results:
            assert r.plan_version == v, (r.seq, r.plan_version, v)
            if where:
                assert r.where == where, (r.seq, r.fallback_reason)
            _check_output(r, expected[k])


def _agent(loaded, worker: str, plan_version: int = 0, **kw) -> Agent:
    kw.setdefault("deadline_seconds", 30)
    return Agent(loaded, InitialPlan(loaded.split(kw.pop("split", "stem")), get_codec(kw.pop("codec", "raw")), worker=worker,
                                     version=plan_version), AgentOptions(connect_timeout=1.0, **kw))


# -- (a) switching at frame boundaries ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_switch_at_frame_boundary_with_frames_in_flight(loaded, frames, expected, workers):
    a, _ = workers

    async def scenario():
        agent = _agent(loaded, a, plan_version=1)
        await agent.start()
        try:
            first = await agent.infer(frames[0])
            assert (first.where, first.split, first.codec, first.plan_version) == ("edge", "stem", "raw", 1)
            started: list[asyncio.Task] = []

            async def tagged(k):
                v = agent.plan_version  # infer takes its plan in this same step (no await between)
                return k, v, await agent.infer(frames[k])

            async def producer():
                after = 0
                while len(started) < 200 and after < 8:  # until 8 frames started after the switch
                    started.append(asyncio.create_task(tagged(len(started) % len(frames))))
                    after += agent.plan_version == 2
                    await asyncio.sleep(0.003)

            async def switch():
                await asyncio.sleep(0.02)  # some frames are in flight by now
                await agent.apply_plan("down", "fp16", None, 2)

            await asyncio.gather(producer(), switch())
            results = await asyncio.gather(*started)
            return first, results, agent.metrics.registry
        finally:
            await agent.close()

    _first, results, reg = asyncio.run(scenario())
    seqs = sorted(r.seq for _, _, r in results)
    assert seqs == list(range(1, len(results) + 1))  # every frame once; seq counts on across the switch
    by_seq = sorted(results, key=lambda t: t[2].seq)
    versions = [r.plan_version for _, _, r in by_seq]
    assert versions == sorted(versions) and {1, 2} <= set(versions), versions  # one boundary, in start order
    for k, v, r in results:
        assert r.plan_version == v and r.where == "edge", (r.seq, r.fallback_reason)
        assert (r.split, r.codec) == (("stem", "raw") if v == 1 else ("down", "fp16"))
        _check_output(r, expected[k])
    assert reg.get_sample_value("edgesplit_agent_plan_version") == 2
    assert reg.get_sample_value("edgesplit_agent_plan_switches_total") == 1


@pytest.mark.timeout(60)
def test_switch_worker_then_local(loaded, frames, expected, workers):
    a, b = workers

    async def scenario():
        agent = _agent(loaded, a, plan_version=1)
        await agent.start()
        old = agent.stream
        try:
            async with Pump(agent, frames) as pump:
                await until(lambda: len(pump.results) >= 4, 20, "frames on worker A")
                await agent.apply_plan("act", "raw+lz4", None, 2, b)
                n = len(pump.results)
                await until(lambda: len(pump.results) >= n + 6, 20, "frames on worker B")
                # the old stream is closed once the frames holding it are done
                await until(lambda: old.closed and not old.is_open, 20, "the old stream to close")
                assert agent.stream.address == b and agent.stream.is_open
                on_b = agent.stream
                await agent.apply_plan("output", "raw", None, 3)
                n = len(pump.results)
                await until(lambda: len(pump.results) >= n + 6, 20, "local frames")
                await until(lambda: on_b.closed, 20, "the stream to B to close")
            return pump
        finally:
            await agent.close()

    pump = asyncio.run(scenario())
    pump.check(expected, where=None)
    for _, v, r in pump.results:
        want = {1: ("stem", "edge"), 2: ("act", "edge"), 3: ("output", "local")}[v]
        assert (r.split, r.where) == want, (r.seq, v, r.fallback_reason)
        if v == 3:
            assert "every layer on the device" in r.fallback_reason and r.wire_bytes == 0


# -- (b) refusals keep the old plan ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_bad_plans_are_refused_and_the_old_plan_stays(loaded, frames, expected, workers, tl_dir):
    a, b = workers
    d, tl_id, _ = tl_dir

    async def scenario():
        agent = _agent(loaded, a, plan_version=5, tl_dir=str(d))
        await agent.start()
        try:
            bad = [
                (("nope", "raw", None, 6), {}, NotFound, "no split point 'nope'"),
                (("act", "zip", None, 6), {}, InvalidInput, "unknown codec 'zip'"),
                (("act", "raw", None, 5), {}, PreconditionFailed, "stale plan: version 5"),
                (("act", "raw", None, 2), {}, PreconditionFailed, "stale plan"),
                (("act", "raw", None, 6), {"model_id": "resnet18"}, PreconditionFailed, "this agent runs"),
                (("stem", "raw", "tl-000000000000", 6), {}, InvalidInput, "tl-000000000000"),
                (("act", "raw", tl_id, 6), {}, PreconditionFailed, "is for split 'stem'"),
                # worker A does not hold the TL: its Prepare answers FAILED_PRECONDITION
                (("stem", "raw", tl_id, 6), {}, PreconditionFailed, f"worker {a} refused"),
                (("act", "raw", None, 6, f"127.0.0.1:{free_port()}"), {}, Unavailable, "did not answer"),
            ]
            for args, kw, cls, text in bad:
                with pytest.raises(cls, match="plan v") as e:
                    await agent.apply_plan(*args, **kw)
                assert text in str(e.value), (args, str(e.value))
                assert (agent.plan_version, agent.split.name, agent.codec.name, agent.tl) == (5, "stem", "raw", None)
                assert agent.stream.address == a
                r = await agent.infer(frames[0])
                assert (r.where, r.plan_version, r.split) == ("edge", 5, "stem"), r.fallback_reason
                _check_output(r, expected[0])
            # the same TL by id, on the worker that holds it: applied, frames carry it
            await agent.apply_plan("stem", "raw", tl_id, 6, b)
            r = await agent.infer(frames[1])
            return r, agent.metrics.registry
        finally:
            await agent.close()

    r, reg = asyncio.run(scenario())
    assert (r.where, r.plan_version, r.split) == ("edge", 6, "stem") and "tl_encode" in r.times, r.fallback_reason
    quarter = loaded.split("stem").fp32_bytes // 4  # the reference TL sends a quarter
    assert quarter < r.wire_bytes <= quarter + 64  # plus the message's shape and dtype (runtime.wire.codec.wire_bytes)
    refusals = {c: reg.get_sample_value("edgesplit_agent_plan_refusals_total", {"code": c})
                for c in ("NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNAVAILABLE")}
    assert refusals == {"NOT_FOUND": 1, "INVALID_ARGUMENT": 2, "FAILED_PRECONDITION": 5, "UNAVAILABLE": 1}


# -- (c, d) the planner link against a fake planner ---------------------------------------------


class FakePlanner(ppb_grpc.PlannerServicer):
    def __init__(self, register_plan: ppb.Plan):
        self.register_plan = register_plan
        self.registers: list[ppb.RegisterAgentRequest] = []
        self.statuses: list[ppb.PlanStatus] = []
        self.telemetry: list[ppb.Telemetry] = []
        self.watchers: list[asyncio.Queue] = []

    async def RegisterAgent(self, request, context):
        self.registers.append(request)
        return ppb.RegisterAgentReply(plan=self.register_plan)

    async def WatchPlan(self, request, context):
        q: asyncio.Queue = asyncio.Queue()
        self.watchers.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self.watchers.remove(q)

    async def ReportTelemetry(self, request_iterator, context):
        async for msg in request_iterator:
            self.telemetry.append(msg)
        return ppb.TelemetryAck(received=len(self.telemetry))

    async def ReportPlanStatus(self, request, context):
        self.statuses.append(request)
        return ppb.PlanStatusAck()

    def push(self, plan: ppb.Plan) -> None:
        for q in self.watchers:
            q.put_nowait(plan)

    def status(self, version: int):
        return next((s for s in self.statuses if s.version == version), None)


async def serve_fake(fake: FakePlanner, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Serve ``fake`` on 127.0.0.1:port (0: any); re-binding a just-freed port is retried (bounded)."""
    for _attempt in range(50):
        server = grpc.aio.server()
        ppb_grpc.add_PlannerServicer_to_server(fake, server)
        try:
            bound = server.add_insecure_port(f"127.0.0.1:{port}")
        except RuntimeError:
            bound = 0
        if bound:
            await server.start()
            return server, bound
        await asyncio.sleep(0.1)
    pytest.fail(f"could not bind 127.0.0.1:{port}")


def _plan(loaded, version: int, split: str, codec: str, worker: str, **kw) -> ppb.Plan:
    return ppb.Plan(agent_id="board-1", version=version, model_id=loaded.name, split_id=split, codec=codec,
                    worker_id="w-a", worker_address=worker, **kw)


INTERVAL = 0.2


def _link(agent, loaded, port: int) -> PlannerLink:
    return PlannerLink(agent, PlannerLinkOptions(
        f"127.0.0.1:{port}", _profile(loaded), "board-1", workers=("w-a",),
        constraints={"min_fidelity": 0.9, "objective": "latency"}, telemetry_interval_seconds=INTERVAL,
        rpc_timeout=5.0, connect_timeout=1.0, backoff_initial=0.1, backoff_max=0.5))


@pytest.mark.timeout(60)
def test_planner_link_follows_plans_and_reports(loaded, frames, expected, workers):
    a, _ = workers

    async def scenario():
        fake = FakePlanner(_plan(loaded, 1, "act", "raw", a))
        server, port = await serve_fake(fake)
        agent = _agent(loaded, a)
        await agent.start()
        link = _link(agent, loaded, port)
        try:
            await link.start()
            await until(lambda: agent.plan_version == 1 and fake.watchers, 20, "plan v1 and a watch")
            async with Pump(agent, frames) as pump:
                await until(lambda: len(pump.results) >= 4, 20, "frames under v1")
                fake.push(_plan(loaded, 2, "down", "fp16", a))
                s2 = await until(lambda: fake.status(2), 20, "status of v2")
                assert s2.applied and agent.plan_version == 2, s2.message
                fake.push(_plan(loaded, 3, "nope", "raw", a))
                s3 = await until(lambda: fake.status(3), 20, "status of v3")
                assert agent.plan_version == 2
                await until(lambda: len(fake.telemetry) >= 3 and any(
                    t.plan_version == 2 and t.bandwidth_bytes_per_second > 0 and t.rtt_seconds > 0 and t.frames > 0
                    for t in fake.telemetry), 20, "telemetry from v2 frames")
            return fake, s3, pump, agent.metrics.registry
        finally:
            await link.close()
            await agent.close()
            await server.stop(0)

    fake, s3, pump, reg = asyncio.run(scenario())
    reg0 = fake.registers[0]
    assert (reg0.agent_id, reg0.model_id, reg0.model_digest) == ("board-1", loaded.name, loaded.digest)
    assert json.loads(reg0.profile_json)["machine"] == "test-board" and list(reg0.workers) == ["w-a"]
    assert reg0.constraints.min_fidelity == 0.9
    assert [(s.version, s.applied) for s in fake.statuses] == [(1, True), (2, True), (3, False)]
    assert "plan v3 refused" in s3.message and "'nope'" in s3.message
    pump.check(expected)
    assert {v for _, v, _ in pump.results} == {1, 2}
    # bounded rate: consecutive messages at least one interval apart (sent_unix is stamped at send time)
    sent = [t.sent_unix for t in fake.telemetry]
    assert len(sent) >= 3 and all(b - a >= INTERVAL - 0.01 for a, b in itertools.pairwise(sent)), sent
    t = fake.telemetry[-1]
    assert t.agent_id == "board-1" and t.worker == "w-a" and "head" in t.stage_seconds
    assert reg.get_sample_value("edgesplit_agent_link_bandwidth_bytes_per_second") > 0
    assert reg.get_sample_value("edgesplit_agent_link_rtt_seconds") > 0


@pytest.mark.timeout(60)
def test_planner_unreachable_keeps_plan_and_reconnects(loaded, frames, expected, workers):
    a, _ = workers

    async def scenario():
        fake1 = FakePlanner(_plan(loaded, 1, "act", "raw", a))
        server1, port = await serve_fake(fake1)
        agent = _agent(loaded, a)
        await agent.start()
        link = _link(agent, loaded, port)
        server2 = None
        try:
            await link.start()
            await until(lambda: agent.plan_version == 1 and fake1.watchers, 20, "plan v1 and a watch")
            async with Pump(agent, frames) as pump:
                await server1.stop(0)  # the planner goes away
                await until(lambda: not link.connected, 10, "the link to notice")
                n = len(pump.results)
                await until(lambda: len(pump.results) >= n + 8, 20, "frames while the planner is down")
                assert link.registrations == 1 and agent.plan_version == 1
                # a planner comes back on the same address: the link registers again and follows it
                fake2 = FakePlanner(_plan(loaded, 1, "act", "raw", a))
                server2, _ = await serve_fake(fake2, port)
                await until(lambda: fake2.registers and fake2.watchers, 20, "re-registration")
                fake2.push(_plan(loaded, 2, "down", "raw", a))
                await until(lambda: fake2.status(2), 20, "status of v2 on the new planner")
                await until(lambda: fake2.telemetry, 10, "telemetry to the new planner")
            return fake2, pump, link
        finally:
            await link.close()
            await agent.close()
            await server1.stop(0)
            if server2 is not None:
                await server2.stop(0)

    fake2, pump, link = asyncio.run(scenario())
    assert link.registrations == 2 and fake2.status(2).applied
    assert fake2.registers[0].model_digest == loaded.digest
    pump.check(expected)  # every frame on the edge, none lost, under the plan it started with
    assert {v for _, v, _ in pump.results} == {1, 2}


def test_config_requires_profile_with_planner():
    from runtime.agent.config import AgentConfig

    with pytest.raises(InvalidInput, match="profile"):
        AgentConfig(planner="127.0.0.1:5")
    assert AgentConfig(planner="127.0.0.1:5", profile="p.json").telemetry_interval_seconds == 1.0


@pytest.mark.timeout(60)
def test_run_agent_follows_the_planner(loaded, workers, tmp_path):
    """`edgesplit agent --planner ... --profile ...`: registers with the profile file, applies the plan,
    closes the link on shutdown; a bad profile file is an error before any frame."""
    import io
    import os
    import signal

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from runtime.agent.config import AgentConfig
    from runtime.agent.run import run_agent

    a, _ = workers
    profile = tmp_path / "board.json"
    _profile(loaded).save(profile)
    sock = f"unix:{tmp_path / 'agent.sock'}"

    async def serving() -> bool:
        async with grpc.aio.insecure_channel(sock) as ch:
            try:
                res = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
        return res.status == health_pb2.HealthCheckResponse.SERVING

    async def scenario():
        fake = FakePlanner(_plan(loaded, 3, "act", "raw", a))
        server, port = await serve_fake(fake)
        base = {"agent_id": "board-1", "worker": a, "model": str(REPO / TINY_NET), "split": "stem", "codec": "raw",
                    "summary": False, "torch_threads": 1, "planner": f"127.0.0.1:{port}", "telemetry_interval_seconds": 0.2}
        try:
            with pytest.raises(InvalidInput, match="cannot read profile"):
                await run_agent(AgentConfig(**base, profile=str(tmp_path / "missing.json"), source="none"))
            task = asyncio.create_task(run_agent(AgentConfig(**base, profile=str(profile), source="none", serve=sock,
                                                             raw_input_stays=True, max_upload_bytes=4096,
                                                             planner_workers=("edge-a",), pin_blocks=("stem=device",),
                                                             forbid_blocks=("3=edge",), max_tier_seconds=("edge=0.5",),
                                                             max_tier_share=("device=0.9",),
                                                             max_link_upload_bytes=("device=8192",),
                                                             max_memory_bytes=("edge=1000000",),
                                                             device_memory_bytes=2**20,
                                                             planner_exclude_workers=("edge-z",)),
                                            out=io.StringIO()))
            await until(lambda: fake.status(3), 20, "plan v3 applied by the agent process")
            deadline = time.monotonic() + 20
            while not await serving():  # the stop handler is installed once the local API serves
                assert time.monotonic() < deadline and not task.done(), "local API never served"
                await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(task, 20)
            await until(lambda: not fake.watchers, 10, "the link to close its watch")
            return fake
        finally:
            await server.stop(0)

    fake = asyncio.run(scenario())
    assert fake.status(3).applied, fake.status(3).message
    assert json.loads(fake.registers[0].profile_json)["machine"] == "test-board"
    # the agent's plan constraints and allowed workers travel with its registration
    reg = fake.registers[-1]
    assert reg.constraints.raw_input_stays and reg.constraints.max_upload_bytes == 4096
    assert reg.constraints.objective == "latency" and list(reg.workers) == ["edge-a"]
    c = reg.constraints
    assert [(e.name, e.tier) for e in c.pin_blocks] == [("stem", "device")]
    assert [(e.index, e.tier) for e in c.forbid_blocks] == [(3, "edge")]
    assert (dict(c.max_tier_seconds), dict(c.max_tier_share)) == ({"edge": 0.5}, {"device": 0.9})
    assert (dict(c.max_link_upload_bytes), dict(c.max_memory_bytes)) == ({"device": 8192}, {"edge": 1_000_000})
    assert c.device_memory_bytes == 2**20 and list(c.exclude_workers) == ["edge-z"]


def test_telemetry_names_no_plan_while_a_band_fallback_runs(loaded, workers):
    """After the agent's own band switch (an entry of the fallback table, under the plan's version) the
    frames run another split than the plan's: telemetry reports version 0, so the planner takes no
    compute sample for the plan's split from them; a newer plan reports its own version again (issue 11)."""
    a, _ = workers

    async def scenario():
        agent = _agent(loaded, a, plan_version=3)
        try:
            seen = [agent.telemetry_plan_version]
            await agent.apply_plan("output", "raw", version=3, worker_address="", fallback=True)
            seen += [agent.telemetry_plan_version, agent.plan_version]
            await agent.apply_plan("stem", "raw", version=4, worker_address=a)
            return [*seen, agent.telemetry_plan_version]
        finally:
            await agent.close()

    assert asyncio.run(scenario()) == [3, 0, 3, 4]


def test_a_local_plan_is_not_refused_for_the_codec_the_agent_kept():
    """A plan naming no codec keeps the current one; a local plan after a jpeg-at-input plan kept jpeg,
    which applies only at split 0, and every local plan was refused (adapt_run: the step down took 33 s)."""
    loaded = load_model("resnet18")

    async def scenario():
        agent = Agent(loaded, InitialPlan(loaded.split("input"), get_codec("jpeg", spec=loaded.spec), version=2))
        try:
            await agent.apply_plan("output", agent.codec, version=3, worker_address="")
            local = (agent.plan_version, agent.split.name, agent.codec.name)
            with pytest.raises(InvalidInput, match="jpeg"):  # a plan that sends still gets the check
                await agent.apply_plan("add_2", "jpeg", version=4, worker_address="127.0.0.1:1")
            return local
        finally:
            await agent.close()

    assert asyncio.run(scenario()) == (3, "output", "raw")


def test_a_pushed_tl_id_is_an_id_never_a_path():
    """A plan's tl_id is looked up in the agent's --tl-dir: a path or a file name from the planner is refused."""
    from runtime.agent.plan import pushed_tl_id

    assert pushed_tl_id("") is None and pushed_tl_id("tl-0123456789ab") == "tl-0123456789ab"
    for bad in ("/etc/passwd.json", "../tl-0123456789ab", "x.safetensors", "a/b", ".tl", "t" * 129, "tl\n"):
        with pytest.raises(InvalidInput, match="not a Transfer Layer id"):
            pushed_tl_id(bad)


@pytest.mark.timeout(60)
def test_a_plan_naming_a_tl_file_is_refused_and_the_old_plan_stays(loaded, workers, tmp_path):
    a, _ = workers
    evil = tmp_path / "evil.json"
    evil.write_text("{}")

    async def scenario():
        fake = FakePlanner(_plan(loaded, 1, "act", "raw", a))
        server, port = await serve_fake(fake)
        agent = _agent(loaded, a)
        await agent.start()
        link = _link(agent, loaded, port)
        try:
            await link.start()
            await until(lambda: agent.plan_version == 1 and fake.watchers, 20, "plan v1 and a watch")
            fake.push(_plan(loaded, 2, "act", "raw", a, tl_id=str(evil)))
            return await until(lambda: fake.status(2), 20, "status of v2"), agent.plan_version
        finally:
            await link.close()
            await agent.close()
            await server.stop(0)

    status, version = asyncio.run(scenario())
    assert not status.applied and "not a Transfer Layer id" in status.message and version == 1
