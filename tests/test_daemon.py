"""The daemon scaffold (runtime.daemon.server) on a real aio server on 127.0.0.1:0: health, reflection,
the error-to-status interceptor, metrics, drain; the planner client; and the Backoff helper."""

from __future__ import annotations

import asyncio
import random
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from runtime.contracts.errors import InvalidInput, NotFound, PreconditionFailed, to_status
from runtime.daemon.planner_client import PlannerClient, PlannerClientOptions, call_planner
from runtime.daemon.server import Daemon, DaemonOptions
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.wire.asyncutil import Backoff

pytestmark = pytest.mark.timeout(60)

RPC = 10.0
SERVICE = ppb.DESCRIPTOR.services_by_name["Planner"].full_name


class FakePlanner(ppb_grpc.PlannerServicer):
    """Raises instead of answering: what the interceptor maps."""

    def __init__(self):
        self.release = asyncio.Event()

    async def RegisterAgent(self, request, context):
        raise InvalidInput(f"no such agent {request.agent_id!r}")

    async def QueryPlan(self, request, context):
        raise ValueError("a bug")

    async def ListAgents(self, request, context):
        return ppb.ListAgentsReply()

    async def ReportPlanStatus(self, request, context):
        await context.abort(grpc.StatusCode.ABORTED, "the servicer's own status")

    async def WatchPlan(self, request, context):
        yield ppb.Plan(agent_id=request.agent_id, version=1)
        raise NotFound("the plan went away")

    async def RegisterWorker(self, request, context):
        await self.release.wait()  # held until the test lets it finish (a call in flight during drain)
        return ppb.RegisterWorkerReply(profiles=1)


async def start(**kw) -> tuple[Daemon, FakePlanner, list]:
    errors: list[tuple[str, str]] = []
    fake = FakePlanner()
    daemon = Daemon(DaemonOptions(listen="127.0.0.1:0", services=(SERVICE,),
                                  on_error=lambda method, code: errors.append((method, code)), **kw))
    await daemon.start(lambda server: ppb_grpc.add_PlannerServicer_to_server(fake, server))
    return daemon, fake, errors


async def health_of(channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC)
    return reply.status


def test_health_serving_then_not_serving_on_drain_which_lets_calls_finish():
    async def main():
        daemon, fake, _ = await start()
        assert daemon.port > 0 and daemon.address == f"127.0.0.1:{daemon.port}"
        async with grpc.aio.insecure_channel(daemon.address) as ch:
            for name in ("", SERVICE):
                assert await health_of(ch, name) == health_pb2.HealthCheckResponse.SERVING
            in_flight = asyncio.ensure_future(ppb_grpc.PlannerStub(ch).RegisterWorker(ppb.RegisterWorkerRequest(),
                                                                                       timeout=RPC))
            quiesced = asyncio.Event()
            seen: list[int] = []

            async def quiesce(grace: float) -> None:
                seen.append(await health_of(ch))  # health already says NOT_SERVING while the work finishes
                fake.release.set()
                assert (await asyncio.wait_for(in_flight, grace)).profiles == 1
                quiesced.set()

            await asyncio.wait_for(daemon.drain(5.0, quiesce), RPC)
            assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING] and quiesced.is_set()
            with pytest.raises(grpc.aio.AioRpcError):
                await health_of(ch)  # stopped

    asyncio.run(main())


def test_reflection_lists_the_service_health_and_reflection():
    async def main():
        daemon, _, _ = await start()
        try:
            async with grpc.aio.insecure_channel(daemon.address) as ch:
                stub = reflection_pb2_grpc.ServerReflectionStub(ch)
                call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=RPC)
                names = {s.name async for r in call for s in r.list_services_response.service}
        finally:
            await daemon.drain(0.1)
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names

    asyncio.run(main())


def test_interceptor_maps_raised_errors_to_statuses():
    async def main():
        daemon, _, errors = await start()
        try:
            async with grpc.aio.insecure_channel(daemon.address) as ch:
                stub = ppb_grpc.PlannerStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await stub.RegisterAgent(ppb.RegisterAgentRequest(agent_id="x"), timeout=RPC)
                with pytest.raises(grpc.aio.AioRpcError) as bug:
                    await stub.QueryPlan(ppb.PlanQuery(), timeout=RPC)
                with pytest.raises(grpc.aio.AioRpcError) as own:
                    await stub.ReportPlanStatus(ppb.PlanStatus(), timeout=RPC)
                call = stub.WatchPlan(ppb.WatchPlanRequest(agent_id="a"), timeout=RPC)
                assert (await call.read()).version == 1
                with pytest.raises(grpc.aio.AioRpcError) as stream:
                    await call.read()
                assert len((await stub.ListAgents(ppb.ListAgentsRequest(), timeout=RPC)).agents) == 0
        finally:
            await daemon.drain(0.1)
        assert (bad.value.code(), bad.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "no such agent 'x'")
        assert (bug.value.code(), bug.value.details()) == (grpc.StatusCode.INTERNAL, "internal error: ValueError: a bug")
        assert (own.value.code(), own.value.details()) == (grpc.StatusCode.ABORTED, "the servicer's own status")
        assert (stream.value.code(), stream.value.details()) == (grpc.StatusCode.NOT_FOUND, "the plan went away")
        method = f"/{SERVICE}/"
        assert errors == [(method + "RegisterAgent", "INVALID_ARGUMENT"), (method + "QueryPlan", "INTERNAL"),
                          (method + "WatchPlan", "NOT_FOUND")]

    asyncio.run(main())


def test_to_status_is_the_one_mapping():
    assert to_status(PreconditionFailed("weights differ")) == (grpc.StatusCode.FAILED_PRECONDITION, "weights differ")
    assert to_status(KeyError("k")) == (grpc.StatusCode.INTERNAL, "internal error: KeyError: 'k'")


def test_metrics_endpoint_serves_and_closes_on_drain():
    registry = CollectorRegistry()
    Counter("edgesplit_test_things", "things", registry=registry).inc(3)

    async def main():
        daemon, _, _ = await start(metrics=registry, metrics_port=0)
        port = daemon.metrics_port
        assert port and daemon.metrics_text() == f"http://127.0.0.1:{port}/metrics"
        loop = asyncio.get_running_loop()
        url = f"http://127.0.0.1:{port}/metrics"
        body = await loop.run_in_executor(None, lambda: urllib.request.urlopen(url, timeout=RPC).read().decode())
        await daemon.drain(0.1)
        assert daemon.metrics_port is None
        return body

    assert "edgesplit_test_things_total 3.0" in asyncio.run(main())


def test_no_metrics_endpoint_unless_asked():
    async def main():
        daemon, _, _ = await start(metrics=CollectorRegistry())  # metrics_port -1: off
        await daemon.drain(0.1)
        return daemon.metrics_port, daemon.metrics_text()

    assert asyncio.run(main()) == (None, "off")


def test_announce_writes_the_port_file(tmp_path, capsys):
    async def main():
        daemon, _, _ = await start()
        daemon.announce("edgesplit test listening", str(tmp_path / "port"))
        await daemon.drain(0.1)
        return daemon.port

    port = asyncio.run(main())
    assert (tmp_path / "port").read_text() == f"{port}\n"
    assert "edgesplit test listening" in capsys.readouterr().out


def test_bind_failure_is_an_error(tmp_path):
    async def main():
        daemon = Daemon(DaemonOptions(listen=f"unix:{tmp_path}/no/such/dir/x.sock"))
        with pytest.raises(OSError, match="could not bind"):
            daemon.bind(lambda server: None)

    asyncio.run(main())


# -- the planner client ----------------------------------------------------------------------------


def test_planner_client_maps_errors_and_ends_streams_with_them():
    async def main():
        daemon, _, _ = await start()
        try:
            async with PlannerClient(PlannerClientOptions(daemon.address, rpc_timeout=RPC)) as planner:
                assert len((await planner.list_agents()).agents) == 0
                with pytest.raises(InvalidInput, match="no such agent"):
                    await planner.register_agent(ppb.RegisterAgentRequest(agent_id="x"))
                plans = []
                with pytest.raises(NotFound, match="went away"):
                    async for plan in planner.watch_plan(ppb.WatchPlanRequest(agent_id="a")):
                        plans.append(plan.version)
                assert plans == [1]
            loop = asyncio.get_running_loop()
            reply = await loop.run_in_executor(None, call_planner, daemon.address, "ListAgents",
                                               ppb.ListAgentsRequest(), RPC)
            assert len(reply.agents) == 0
        finally:
            await daemon.drain(0.1)

    asyncio.run(main())


def test_planner_client_connect_times_out_as_unavailable():
    from runtime.contracts.errors import Unavailable

    async def main():
        with pytest.raises(Unavailable, match="unreachable"):
            await PlannerClient(PlannerClientOptions("127.0.0.1:1", connect_timeout=0.2)).connect()

    asyncio.run(main())


# -- Backoff ---------------------------------------------------------------------------------------


def test_backoff_doubles_to_its_bound_and_resets():
    b = Backoff(0.5, 4.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.current == 0.5 and b.next() == 0.5
    assert [Backoff(1, 10, multiplier=3).next() for _ in range(1)] == [1]


def test_backoff_jitter_stays_within_its_fraction():
    b = Backoff(1.0, 8.0, jitter=0.5, rng=random.Random(7))
    delays = [b.next() for _ in range(6)]
    for got, nominal in zip(delays, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0], strict=True):
        assert nominal * 0.5 <= got <= nominal


@pytest.mark.parametrize("kw", [{"initial": -1}, {"initial": 2, "maximum": 1}, {"multiplier": 0.5}, {"jitter": 2}])
def test_backoff_rejects_nonsense(kw):
    with pytest.raises(ValueError):
        Backoff(**kw)


def test_backoff_sleep_waits_the_delay():
    async def main():
        b = Backoff(0.01, 0.02)
        return [await b.sleep(), await b.sleep(), await b.sleep()]

    assert asyncio.run(main()) == [0.01, 0.02, 0.02]
