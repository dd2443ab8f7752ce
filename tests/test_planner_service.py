"""The planner daemon over real gRPC: plans, errors, telemetry with hysteresis, refusals, restarts.

One event loop runs in a background thread for the module (as in test_worker.py); each test
starts its own planner on ``127.0.0.1:0`` with a fresh SQLite file and hands the loop a coroutine.

The profiles are small and hand-written, so every expected plan is computed by hand below:
5 blocks, the device 10x slower than the edge, outputs shrinking, raw transfers only, RTT 5 ms.
Latency of a cut after ``a`` blocks = device[:a] + RTT + bytes[a] / bw + edge[a:] + result / bw.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import urllib.request

import grpc
import pytest
from conftest import terminate, wait_for, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from planner_helpers import (
    DEVICE_PROFILE,
    DEVICE_S,
    EDGE_PROFILE,
    EDGE_S,
    FAST,
    MODEL,
    OUT,
    RPC,
    RTT,
    SLOW,
    Planner,
    check_status,
    expected_seconds,
    next_plan,
    profile,
    rpc_error,
)

from planner.config import PlannerConfig
from planner.hysteresis import Hysteresis
from planner.server import SERVICE_NAME
from planner.store import REFUSED, AgentRecord, LinkRecord, Store, WorkerRecord
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

pytestmark = pytest.mark.timeout(60)


# -- plans -----------------------------------------------------------------------------------------


def test_registration_gives_the_hand_computed_plan(aio, planner):
    assert min(range(6), key=lambda a: expected_seconds(a, FAST)) == 2  # the fixture's premise

    async def scenario():
        plan = await planner.register()
        assert (plan.split_id, plan.split_index, plan.worker_id, plan.worker_address, plan.codec) == \
               ("conv2", 2, "w1", "127.0.0.1:50051", "raw")
        assert plan.version >= 1 and plan.model_id == MODEL and plan.reason == "registration"
        assert plan.predicted_seconds == pytest.approx(expected_seconds(2, FAST))
        assert plan.predicted_bytes == OUT[1]
        assert plan.breakdown_seconds["transfer:device->edge"] == pytest.approx(OUT[1] / FAST)
        assert plan.breakdown_seconds["compute:device"] == pytest.approx(0.040)
        # registering again under the same conditions keeps the plan and its version
        again = await planner.register()
        assert again.version == plan.version
        info = (await planner.agents())["a1"]
        assert info.plan.version == plan.version and info.telemetry_age_seconds == -1

    aio.run(scenario())


def test_agent_without_workers_runs_locally_until_one_registers(aio, planner):
    async def scenario():
        plan = await planner.register(worker_profiles=())
        assert (plan.split_id, plan.split_index, plan.worker_id, plan.codec) == ("output", 5, "", "")
        assert plan.predicted_seconds == pytest.approx(sum(DEVICE_S))
        watch = planner.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC)
        assert (await next_plan(watch)).version == plan.version
        t0 = time.monotonic()
        await planner.stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:50051",
                                                                   profiles_json=[EDGE_PROFILE]), timeout=RPC)
        new = await next_plan(watch)  # a running plan is only replaced once the gain held
        assert time.monotonic() - t0 >= 0.3 - 0.01
        assert (new.split_id, new.worker_id) == ("conv2", "w1") and new.version > plan.version
        watch.cancel()

    aio.run(scenario())


def test_query_ranks_top_n(aio, planner):
    async def scenario():
        await planner.register()
        reply = await planner.stub.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=3), timeout=RPC)
        order = sorted(range(6), key=lambda a: expected_seconds(a, FAST))[:3]
        assert [c.split_index for c in reply.candidates] == order == [2, 3, 0]
        assert [c.split_id for c in reply.candidates] == ["conv2", "conv3", "input"]
        assert [c.predicted_seconds for c in reply.candidates] == pytest.approx([expected_seconds(a, FAST) for a in order])
        assert all(c.breakdown_seconds for c in reply.candidates)
        assert 0 < reply.decision_seconds < 5
        # the same agent under other conditions: at 1 MB/s local wins, then a cut after 4 blocks
        slow = await planner.stub.QueryPlan(pb.PlanQuery(agent_id="a1", bandwidth_bytes_per_second=SLOW), timeout=RPC)
        assert [c.split_id for c in slow.candidates][:2] == ["output", "conv4"]
        assert len(slow.candidates) == 5  # the planner's default top_n

    aio.run(scenario())


def test_lower_bandwidth_switches_plan_only_after_hold(aio, planner):
    async def scenario():
        first = await planner.register()
        watch = planner.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC)
        assert (await next_plan(watch)).version == first.version
        t0 = time.monotonic()
        assert await planner.telemetry(SLOW) == 1
        new = await next_plan(watch)
        assert time.monotonic() - t0 >= 0.3 - 0.01  # hold_seconds
        assert new.version > first.version and (new.split_id, new.worker_id) == ("output", "")
        assert new.reason.startswith("telemetry")
        info = (await planner.agents())["a1"]
        assert info.plan.version == new.version and info.telemetry_age_seconds >= 0
        watch.cancel()

    aio.run(scenario())


def test_watch_resumes_from_known_version_and_does_not_leak(aio, planner):
    async def scenario():
        plan = await planner.register()
        service = planner.ps.service
        calls = [planner.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC) for _ in range(3)]
        for c in calls:
            assert (await next_plan(c)).version == plan.version
        assert len(service.broadcaster.watchers("a1")) == 3
        for c in calls:
            c.cancel()
        deadline = time.monotonic() + 5
        while service.broadcaster.watchers("a1") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not service.broadcaster.watchers("a1")
        # a watcher that already knows the current version waits for the next one
        call = planner.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1", known_version=plan.version), timeout=RPC)
        await planner.telemetry(SLOW)
        assert (await next_plan(call)).version > plan.version
        call.cancel()

    aio.run(scenario())


def test_refusal_keeps_the_running_plan_and_is_not_pushed_again(aio, planner):
    async def scenario():
        first = await planner.register()
        watch = planner.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC)
        await next_plan(watch)
        await planner.telemetry(SLOW)
        local = await next_plan(watch)
        assert local.split_id == "output"
        await planner.stub.ReportPlanStatus(pb.PlanStatus(agent_id="a1", version=local.version, applied=False,
                                                          message="camera pipeline needs the edge"), timeout=RPC)
        info = (await planner.agents())["a1"]
        assert info.plan.version == first.version  # what runs is still the first plan
        assert (info.refused_version, info.refused_message) == (local.version, "camera pipeline needs the edge")
        # the next best that is not the refused plan: a cut after 4 blocks (0.100 s vs 0.254 s for conv2)
        nxt = await next_plan(watch)
        assert nxt.version > local.version and (nxt.split_id, nxt.worker_id) == ("conv4", "w1")
        assert nxt.predicted_seconds == pytest.approx(expected_seconds(4, SLOW))
        await planner.stub.ReportPlanStatus(pb.PlanStatus(agent_id="a1", version=nxt.version, applied=True), timeout=RPC)
        # once conditions change (the link halves again), the refused configuration may come back
        await planner.telemetry(SLOW / 2)
        again = await next_plan(watch)
        assert (again.split_id, again.worker_id) == ("output", "") and again.version > nxt.version
        watch.cancel()
        hist = planner.ps.service.store.history("a1")
        assert [(h.plan.version, h.status) for h in hist][1:3] == [(nxt.version, "applied"), (local.version, REFUSED)]

    aio.run(scenario())


def test_restart_restores_agents_plans_and_history(aio, tmp_path):
    db = tmp_path / "planner.sqlite"

    async def first_life():
        p = await Planner.start(db)
        try:
            v1 = await p.register()
            watch = p.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC)
            await next_plan(watch)
            await p.telemetry(SLOW)
            v2 = await next_plan(watch)
            watch.cancel()
            return v1, v2, await p.agents()
        finally:
            await p.stop()

    async def second_life(v1, v2, before):
        p = await Planner.start(db)
        try:
            after = await p.agents()
            assert after.keys() == before.keys() == {"a1"}
            assert after["a1"].plan == before["a1"].plan and after["a1"].plan.version == v2.version
            assert after["a1"].bandwidth_bytes_per_second == 0  # local plan: no link shown
            service = p.ps.service
            assert service.agents["a1"].links["w1"].bandwidth_bytes_per_second == SLOW
            assert [h.plan.version for h in service.store.history("a1")] == [v2.version, v1.version]
            # the restored link still drives decisions, and the next version is higher than any before
            q = await p.stub.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=1), timeout=RPC)
            assert q.candidates[0].split_id == "output"
            v3 = await p.register(constraints=pb.Constraints(raw_input_stays=True, max_device_seconds=0.05))
            assert v3.version > v2.version and v3.worker_id == "w1"
        finally:
            await p.stop()

    v1, v2, before = aio.run(first_life())
    assert v2.version > v1.version
    aio.run(second_life(v1, v2, before))


def test_infeasible_plan_is_replaced_at_once(aio, tmp_path):
    async def scenario():
        p = await Planner.start(tmp_path / "planner.sqlite", hold_seconds=30.0)  # a held switch would never come
        try:
            v1 = await p.register()
            watch = p.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC)
            assert (await next_plan(watch)).version == v1.version
            # the worker moved: same split, new address, no hold
            await p.stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:50099",
                                                                 profiles_json=[EDGE_PROFILE]), timeout=RPC)
            moved = await next_plan(watch)
            assert (moved.split_id, moved.worker_address) == ("conv2", "127.0.0.1:50099") and "no longer feasible" in moved.reason
            # the worker no longer serves the model: back to the device at once
            await p.stub.RegisterWorker(pb.RegisterWorkerRequest(
                worker_id="w1", address="127.0.0.1:50099", profiles_json=[profile("xeon", "edge", EDGE_S, model="other")]),
                timeout=RPC)
            local = await next_plan(watch)
            assert (local.split_id, local.worker_id) == ("output", "") and local.version > moved.version > v1.version
            watch.cancel()
        finally:
            await p.stop()

    aio.run(scenario())


def test_telemetry_processing_is_rate_limited(aio, tmp_path):
    async def scenario():
        p = await Planner.start(tmp_path / "planner.sqlite", telemetry_max_rate_hz=0.5, replan_interval_seconds=5.0)
        try:
            await p.register()
            registry = p.ps.service.metrics.registry
            # decisions telemetry queued (planner.intake), not searches (a plan's bands rank a dozen times)
            decisions = lambda: registry.get_sample_value("edgesplit_planner_decision_latency_seconds_count")  # noqa: E731
            before = decisions()

            async def messages():  # every one moves the link out of the running plan's band
                for i in range(30):
                    yield pb.Telemetry(agent_id="a1", worker="w1", bandwidth_bytes_per_second=(FAST, SLOW)[i % 2] + i,
                                       rtt_seconds=RTT)

            ack = await p.stub.ReportTelemetry(messages(), timeout=RPC)
            assert ack.received == 30
            intake = p.ps.service.replanner.intake
            for _ in range(200):
                if not len(intake):
                    break
                await asyncio.sleep(0.01)
            assert 1 <= decisions() - before <= 2  # the first acts (one more for reports that came meanwhile); the rest wait for the periodic pass
            st = p.ps.service.agents["a1"]
            assert st.links["w1"].bandwidth_bytes_per_second == SLOW + 29
        finally:
            await p.stop()

    aio.run(scenario())


# -- errors ----------------------------------------------------------------------------------------


def test_bad_input_is_answered_with_actionable_status(aio, planner):
    async def scenario():
        s = planner.stub
        err = await rpc_error(s.RegisterWorker(pb.RegisterWorkerRequest(
            worker_id="w1", address="127.0.0.1:50051", profiles_json=["{not json"]), timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, r"profiles_json\[0\]: not valid JSON")
        err = await rpc_error(s.RegisterWorker(pb.RegisterWorkerRequest(
            worker_id="w1", address="127.0.0.1:50051", profiles_json=['{"format": "edgesplit-profile", "version": 1}']),
            timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, r"profiles_json\[0\].*required")
        err = await rpc_error(s.RegisterWorker(pb.RegisterWorkerRequest(
            worker_id="w1", address="nowhere", profiles_json=[EDGE_PROFILE]), timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "HOST:PORT")
        err = await rpc_error(s.RegisterWorker(pb.RegisterWorkerRequest(
            worker_id="bad id!", address="127.0.0.1:1", profiles_json=[EDGE_PROFILE]), timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "worker_id 'bad id!' is not a valid id")
        err = await rpc_error(s.RegisterWorker(pb.RegisterWorkerRequest(
            worker_id="w1", address="127.0.0.1:1", profiles_json=[EDGE_PROFILE] * 65), timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "max_profiles_per_worker")
        err = await rpc_error(s.RegisterWorker(pb.RegisterWorkerRequest(
            worker_id="w1", address="127.0.0.1:1", profiles_json=[EDGE_PROFILE, EDGE_PROFILE]), timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "second profile of tinynet")
        err = await rpc_error(s.RegisterAgent(pb.RegisterAgentRequest(
            agent_id="a1", model_id="resnet18", profile_json=DEVICE_PROFILE), timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "profile of 'tinynet' but model_id is 'resnet18'")
        err = await rpc_error(s.RegisterAgent(pb.RegisterAgentRequest(
            agent_id="a1", model_id=MODEL, profile_json=EDGE_PROFILE), timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "role 'edge'.*role device")
        err = await rpc_error(s.RegisterAgent(pb.RegisterAgentRequest(
            agent_id="a1", model_id=MODEL, profile_json=DEVICE_PROFILE, constraints=pb.Constraints(min_fidelity=2)),
            timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "min_fidelity")
        # a worker whose profile cuts the model differently cannot take this agent's frames
        other = profile("xeon", "edge", EDGE_S, names=("c1", "c2", "c3", "c4", "fc"))
        await s.RegisterWorker(pb.RegisterWorkerRequest(worker_id="w2", address="127.0.0.1:50052",
                                                        profiles_json=[other]), timeout=RPC)
        err = await rpc_error(s.RegisterAgent(pb.RegisterAgentRequest(
            agent_id="a1", model_id=MODEL, profile_json=DEVICE_PROFILE, workers=["w2"]), timeout=RPC))
        check_status(err, grpc.StatusCode.FAILED_PRECONDITION, "w2's profile of tinynet.*first differ at block 0")
        # unknown agent, unknown plan
        for call in (s.QueryPlan(pb.PlanQuery(agent_id="ghost"), timeout=RPC),
                     s.ReportPlanStatus(pb.PlanStatus(agent_id="ghost", version=1, applied=True), timeout=RPC)):
            check_status(await rpc_error(call), grpc.StatusCode.NOT_FOUND, "'ghost' is not registered.*RegisterAgent")
        watch = s.WatchPlan(pb.WatchPlanRequest(agent_id="ghost"), timeout=RPC)
        check_status(await rpc_error(watch.read()), grpc.StatusCode.NOT_FOUND, "RegisterAgent first")
        await planner.register()
        err = await rpc_error(s.ReportPlanStatus(pb.PlanStatus(agent_id="a1", version=999, applied=True), timeout=RPC))
        check_status(err, grpc.StatusCode.NOT_FOUND, "no plan version 999.*current plan is v")
        err = await rpc_error(s.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=500), timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "max_top_n")
        err = await rpc_error(planner.telemetry(-5.0))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "bandwidth_bytes_per_second must be a finite number >= 0")
        # telemetry about a worker the planner does not know is counted and its link ignored (the stream lives on)
        assert await planner.telemetry(SLOW, worker="nobody") == 1
        assert "nobody" not in planner.ps.service.agents["a1"].links
        assert planner.ps.service.metrics.registry.get_sample_value("edgesplit_planner_telemetry_unknown_worker_total") == 1
        # an agent that knows only the worker's address: the link is the worker's
        assert await planner.telemetry(SLOW, worker="127.0.0.1:50051") == 1
        assert planner.ps.service.agents["a1"].links["w1"].bandwidth_bytes_per_second == SLOW

    aio.run(scenario())


# -- daemon ----------------------------------------------------------------------------------------


def test_health_reflection_and_metrics(aio, tmp_path):
    async def scenario():
        p = await Planner.start(tmp_path / "m.sqlite", metrics_port=0)
        try:
            for service in ("", SERVICE_NAME):
                resp = await health_pb2_grpc.HealthStub(p.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                        timeout=RPC)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            call = reflection_pb2_grpc.ServerReflectionStub(p.channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC)
            listed = {svc.name async for r in call for svc in r.list_services_response.service}
            assert {"edgesplit.v1.Planner", "grpc.health.v1.Health"} <= listed
            await p.register()
            await p.telemetry(FAST)
            plan = (await p.agents())["a1"].plan
            await p.stub.ReportPlanStatus(pb.PlanStatus(agent_id="a1", version=plan.version, applied=False), timeout=RPC)
            port = p.ps.metrics_port
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=RPC).read().decode())
        finally:
            await p.stop()
        return text

    text = aio.run(scenario())
    for name in ("edgesplit_planner_agents 1.0", "edgesplit_planner_workers 1.0",
                 'edgesplit_planner_plan_changes_total{reason="registration"} 1.0',
                 'edgesplit_planner_decision_seconds_bucket{le="0.0001"}', "edgesplit_planner_telemetry_messages_total 1.0",
                 "edgesplit_planner_telemetry_delay_seconds_count 1.0", "edgesplit_planner_telemetry_max_age_seconds",
                 "edgesplit_planner_refusals_total 1.0", "edgesplit_planner_watchers 0.0"):
        assert name in text, name


def test_serve_command_answers_health_and_drains_on_sigterm(reaper, tmp_path):
    port_file = tmp_path / "port"
    proc = reaper.spawn([sys.executable, "-m", "runtime.cli.main", "planner", "serve", "--listen", "127.0.0.1:0", "--port-file",
                         str(port_file), "--db", str(tmp_path / "p.sqlite"), "--grace-seconds", "1"], log=tmp_path / "log")
    port = wait_for(lambda: port_file.exists() and port_file.read_text().endswith("\n") and port_file.read_text().strip(), 30, "the planner's port file", proc)
    wait_serving(f"127.0.0.1:{port}", proc, timeout=30)
    assert terminate(proc, timeout=15) == 0
    assert Store(tmp_path / "p.sqlite").last_version() == 0


def test_cli_query_and_agents(aio, planner, capsys):
    from runtime.cli.main import build_parser

    aio.run(planner.register())
    parser = build_parser()
    for argv in (["planner", "query", "--planner", planner.address, "--agent", "a1", "--bandwidth-mbps", "8", "--top", "2"],
                 ["planner", "agents", "--planner", planner.address]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "(local)" in lines[1] and "output" in lines[1], out  # 8 Mbit/s = 1 MB/s: local wins
    assert "conv4" in lines[2] and "decided in" in out
    assert re.search(r"^a1\s+tinynet\s+\d+\s+w1\s+conv2\s+raw", out, re.M), out


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(bandwidths, dt: float, gain: float = 0.10, min_gain: float = 0.002, hold: float = 3.0):
    """One evaluation per ``dt`` seconds of measured bandwidth; returns the (time, cut) switches."""
    clock = FakeClock()
    h = Hysteresis(gain, min_gain, hold, clock)
    best_at = lambda bw: min(range(6), key=lambda a: expected_seconds(a, bw))  # noqa: E731
    cut, switches = best_at(bandwidths[0]), []
    for i, bw in enumerate(bandwidths):
        clock.t = i * dt
        best = best_at(bw)
        if best == cut:
            h.reset("a")
        elif h.update("a", expected_seconds(cut, bw), expected_seconds(best, bw)).switch:
            cut = best
            switches.append((clock.t, cut))
    return switches


def test_hysteresis_no_flapping_when_bandwidth_jitters_across_a_boundary():
    # a cut after 3 blocks wins above ~2.45 MB/s, local below; the link jitters across every 0.1 s
    assert [min(range(6), key=lambda a: expected_seconds(a, bw)) for bw in (3.5e6, 1.5e6, 1.0e6)] == [3, 5, 5]
    jitter = [3.5e6 if i % 2 == 0 else 1.5e6 for i in range(200)]
    assert len(simulate(jitter, 0.1, gain=0, min_gain=0, hold=0)) > 100  # without hysteresis: flapping
    assert simulate(jitter, 0.1) == []
    # a dip shorter than hold_seconds does not switch either
    assert simulate([3.5e6] * 20 + [1.0e6] * 25 + [3.5e6] * 20, 0.1) == []
    # a lasting drop switches once, hold_seconds after it began, and stays
    assert simulate([3.5e6] * 10 + [1.0e6] * 100, 0.1) == [(pytest.approx(4.0), 5)]


def test_hysteresis_thresholds_and_infeasible():
    clock = FakeClock()
    h = Hysteresis(0.10, 0.002, 1.0, clock)
    assert not h.update("a", 0.100, 0.095).switch  # 5 ms < 10 % of 100 ms
    assert not h.update("a", 0.010, 0.0085).switch  # 1.5 ms < the 2 ms floor
    assert not h.update("a", 0.100, 0.080).switch and h.holding("a")
    clock.t = 0.5
    assert not h.update("a", 0.100, 0.080).switch
    clock.t = 1.0
    v = h.update("a", 0.100, 0.080)
    assert v.switch and v.held_seconds == pytest.approx(1.0) and not h.holding("a")
    assert h.update("b", None, 1.0).switch  # the running plan became infeasible: at once


# -- store (pure) ----------------------------------------------------------------------------------


def test_store_reopen_restores_everything(tmp_path):
    path = tmp_path / "s.sqlite"
    s = Store(path)
    s.put_worker(WorkerRecord("w1", "10.0.0.5:50051", "edge", ("tl-1",), {MODEL: EDGE_PROFILE}, 1.0, 2.0))
    s.put_agent(AgentRecord("a1", MODEL, "w1", DEVICE_PROFILE, ("w1",), ("tl-1",),
                            pb.Constraints(min_fidelity=0.9, exclude_workers=["w9"]), 1.0, 2.0))
    s.put_link("a1", "w1", LinkRecord(0.004, 2.5e6, 3.0))
    p1 = s.issue_plan(pb.Plan(agent_id="a1", split_id="conv2", reason="registration"))
    p2 = s.issue_plan(pb.Plan(agent_id="a1", split_id="output", reason="telemetry"))
    assert (p1.version, p2.version) == (1, 2)
    assert s.set_plan_status("a1", 2, REFUSED, "no")
    assert not s.set_plan_status("a1", 7, REFUSED, "no")
    s.close()
    s = Store(path)
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    w = s.workers()["w1"]
    assert (w.address, w.tl_ids, w.profiles) == ("10.0.0.5:50051", ("tl-1",), {MODEL: EDGE_PROFILE})
    a = s.agents()["a1"]
    assert (a.workers, a.constraints.min_fidelity, list(a.constraints.exclude_workers)) == (("w1",), 0.9, ["w9"])
    assert (a.refused_version, a.refused_message) == (2, "no")
    assert s.links()["a1"]["w1"] == LinkRecord(0.004, 2.5e6, 3.0)
    assert s.current_plans()["a1"].plan == p1 and s.current_plan("a1").plan == p1
    assert [h.plan.version for h in s.history("a1")] == [2, 1]
    assert s.issue_plan(pb.Plan(agent_id="b")).version == 3  # the counter survives
    s.close()


def test_close_returns_while_registrations_keep_waking_the_planner(tmp_path):
    """Regression: RegisterWorker/telemetry set the re-plan event all the time; on Python 3.11
    asyncio.wait_for could swallow the ticker's cancellation in that race and close() (and so a
    SIGTERM drain) waited forever. close() must return promptly however busy the event is."""
    from planner.service import PlannerService

    async def main():
        service = PlannerService(PlannerConfig(db=str(tmp_path / "p.sqlite"), replan_interval_seconds=0.001),
                                 Store(tmp_path / "p.sqlite"))
        service.start()
        stop = asyncio.Event()

        async def poke():
            while not stop.is_set():
                service.replanner.wake()
                await asyncio.sleep(0)

        poker = asyncio.create_task(poke())
        await asyncio.sleep(0.2)
        try:
            for _ in range(3):  # several tries: the race is timing-dependent
                await asyncio.wait_for(service.close(), 10)
                service.replanner._closing, service.replanner._ticker = False, None
                service.start()
                await asyncio.sleep(0.05)
            await asyncio.wait_for(service.close(), 10)
        finally:
            stop.set()
            await poker
            service.store.close()

    asyncio.run(main())
