"""Active link probes (runtime.agent.prober) through the project's relay (runtime.tools.netem) on
loopback: a probe measures a link no frame measures, stays within its budget, and a probe that
times out is a censored sample."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from runtime.agent.metrics import AgentMetrics
from runtime.agent.prober import ProbeOptions, Prober
from runtime.agent.telemetry import LinkEstimator
from runtime.contracts.errors import InvalidInput
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.tools.netem import DelayProxy, LinkShape
from runtime.wire.transport import TransportOptions
from runtime.worker import probe

pytestmark = pytest.mark.timeout(60)

RATE = 250_000.0  # bytes/s: 2 Mbit/s


class _Probed(pb_grpc.InferenceServicer):
    async def Probe(self, request, context):
        return probe.answer(request)


async def _worker() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(_Probed(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _agent(worker: str = "") -> SimpleNamespace:
    return SimpleNamespace(link=LinkEstimator(), metrics=AgentMetrics(), transport=TransportOptions(),
                           active=SimpleNamespace(worker=worker))


def test_a_probe_measures_the_relay_rate_and_then_waits_for_its_budget():
    async def scenario():
        server, target = await _worker()
        try:
            async with DelayProxy(target, LinkShape(0.005, RATE)) as relay:
                agent = _agent()
                prober = Prober(agent, ProbeOptions(min_bytes=32 * 1024, first_bytes=32 * 1024))
                address = relay.address
                assert prober.due(address, agent.link.clock())  # unknown: worth a probe
                for _ in range(3):
                    await prober.probe(address)
                est = agent.link.estimate(address)
                now = agent.link.clock()
                assert not prober.due(address, now)  # budget: 5 % of the link
                wait = prober._next[address] - now
                await prober.close()
                return est.bandwidth.value, est.bandwidth.samples, est.rtt.value, wait, prober.probe_bytes, agent
        finally:
            await server.stop(None)

    bw, samples, rtt, wait, sent, agent = asyncio.run(scenario())
    assert samples == 3 and 0.4 * RATE < bw < 1.5 * RATE, bw
    assert rtt >= 0.009  # two one-way delays of 5 ms
    assert wait >= 32 * 1024 / (0.05 * 1.5 * RATE) - 0.1  # bytes / (5 % of the estimate)
    assert agent.metrics.registry.get_sample_value("edgesplit_agent_probe_bytes_total") == sent == 3 * 32 * 1024


def test_a_probe_that_times_out_is_a_censored_sample_and_backs_off():
    async def scenario():
        server, target = await _worker()
        try:
            async with DelayProxy(target, LinkShape(0.0, 2_000.0)) as relay:  # 2 KB/s: 16 KiB cannot pass in 0.5 s
                agent = _agent()
                prober = Prober(agent, ProbeOptions(timeout_seconds=0.5, unknown_interval_seconds=1.0))
                assert await prober.probe(relay.address) is None
                est = agent.link.estimate(relay.address)
                wait = prober._next[relay.address] - agent.link.clock()
                await prober.close()
                return est, wait
        finally:
            await server.stop(None)

    est, wait = asyncio.run(scenario())
    # the bound bytes / (timeout - base RTT), taken as the first figure (the RTT check crossed the slow relay too)
    assert est.bandwidth.samples == 1 and est.bandwidth.value == pytest.approx(16 * 1024 / (0.5 - est.rtt.value))
    assert wait > 1.0  # a failed probe doubles the wait


def test_the_plans_fresh_link_and_a_zero_budget_are_not_probed():
    agent = _agent("w:1")  # the plan sends frames to w:1
    prober = Prober(agent, ProbeOptions(refresh_seconds=30.0))
    agent.link.add_bandwidth_sample(RATE, "w:1")
    agent.link.add_bandwidth_sample(RATE, "w:3")
    now = agent.link.clock()
    assert not prober.due("w:1", now) and prober.due("w:2", now)  # frames measure w:1; w:2 is unknown
    assert prober.due("w:3", now)  # measured, but no frame measures it now: only a probe can see it change
    assert prober.due("w:1", now + 31.0)  # the plan's frames stopped measuring it (e.g. too small)
    assert not Prober(agent, ProbeOptions(budget_fraction=0.0)).due("w:2", now)
    assert asyncio.run(Prober(agent, ProbeOptions(budget_fraction=0.0)).round(["w:2"])) == 0


def test_the_worker_refuses_an_oversized_probe():
    with pytest.raises(InvalidInput, match="over the worker's limit"):
        probe.answer(pb.ProbeRequest(payload=bytes(2049)), limit=2048)
    assert probe.answer(pb.ProbeRequest(payload=bytes(2048)), limit=2048).received_bytes == 2048


def test_a_late_frame_is_checked_by_a_probe_before_it_counts():
    """A late frame's bound counts once a probe finds the link that slow (a collapse), and not when the
    probe crosses quickly (the worker stalled, not the link)."""
    async def check(rate: float, estimate: float, bound: float):
        server, target = await _worker()
        try:
            async with DelayProxy(target, LinkShape(0.005, rate)) as relay:
                agent = _agent(relay.address)
                prober = Prober(agent)
                assert agent.link.confirm == prober.confirm  # the estimator hands late frames to the prober
                bounds: list[float] = []
                agent.link.bound_listeners.append(lambda key, b: bounds.append(b))
                for _ in range(3):
                    agent.link.add_bandwidth_sample(estimate, relay.address)
                assert agent.link.observe_late(relay.address, bound, 3.5)
                prober.confirm(relay.address, bound)  # a second late frame meanwhile: one check at a time
                await asyncio.gather(*prober._confirming.values())
                result = (agent.link.estimate(relay.address).bandwidth.value, bounds, prober.confirmations,
                          prober.confirmed)
                await prober.close()
                assert agent.link.confirm is None
                return result
        finally:
            await server.stop(None)

    # the link collapsed to 2 Mbit/s while the estimate says 80: the late frame's bound is confirmed
    bw, bounds, checks, confirmed = asyncio.run(check(RATE, 10e6, 1.2 * RATE))
    assert (checks, confirmed) == (1, 1) and bounds == [1.2 * RATE] and bw < 1.5 * RATE
    # the link is fast (no rate cap): the frame was late for another reason; the estimate stands
    bw, bounds, checks, confirmed = asyncio.run(check(0.0, 10e6, 30e3))
    assert (checks, confirmed) == (1, 0) and bounds == [] and bw > 100 * 30e3  # no step down to the bound


def test_a_quick_probe_below_the_estimate_is_no_evidence():
    agent = _agent()
    agent.link.add_bandwidth_sample(6e6, "w:1")
    assert not agent.link.add_lower_bound_sample(4e5, "w:1")  # a lower bound below: says nothing
    assert agent.link.estimate("w:1").bandwidth.value == 6e6
    assert agent.link.add_lower_bound_sample(8e6, "w:1")  # above: a sample
    assert agent.link.add_lower_bound_sample(1e5, "w:2")  # an unknown link: its first figure
