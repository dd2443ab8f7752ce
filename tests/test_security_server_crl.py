"""Clients check the server's certificate against the CRL (issue 10; runtime.wire.crl.ServerCheck):
grpc's Python client does not expose the server's certificate, so a secure channel given
``--crl-file`` makes one TLS handshake of its own (same CA, same client certificate) before its first
call, reads the server's certificate there and refuses a revoked one UNAUTHENTICATED, before any
call reaches the server (its handler count stays 0), counted in
edgesplit_server_certificate_refused_total{reason="revoked"}. A server revoked while the channel lives
is refused from the next call after the CRL is re-read. A real agent whose worker is revoked runs its
frames locally."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.tools import pki
from runtime.wire import crl as crl_mod
from runtime.wire.transport import TransportOptions
from tests.security_site import site  # noqa: F401 (fixture)
from tests.test_security import creds, start

pytestmark = pytest.mark.timeout(120)


def revoke(site_dir, *stems):
    pki.revoke(pki.read(site_dir, "ca"), site_dir / "crl.pem", [(site_dir / f"{s}.pem").read_bytes() for s in stems])


async def prepare_on(channel) -> str:
    return (await pb_grpc.InferenceStub(channel).Prepare(pb.PrepareRequest(), timeout=5.0)).model_digest


def test_a_revoked_server_is_refused_before_any_call_reaches_it(site):  # noqa: F811
    revoke(site, "worker-w1")
    registry = CollectorRegistry()
    crl_mod.register_metrics(registry)
    before = registry.get_sample_value("edgesplit_server_certificate_refused_total", {"reason": "revoked"})

    async def go():
        daemon, servicer = await start(creds(site, "worker-w1"))
        channel = TransportOptions(security=creds(site, "agent-a1", crl_file=str(site / "crl.pem"))).aio_channel(
            f"127.0.0.1:{daemon.port}")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await prepare_on(channel)
            with pytest.raises(grpc.aio.AioRpcError) as ready:  # what stream owners await before opening one
                await channel.channel_ready()
            return unary.value, ready.value, servicer.calls, daemon.auth.admitted
        finally:
            await channel.close()
            await daemon.drain(0.5)

    unary, ready, calls, admitted = asyncio.run(go())
    for err in (unary, ready):
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "server certificate" in err.details() and "is revoked by" in err.details()
    assert calls == 0 and admitted == 0
    after = registry.get_sample_value("edgesplit_server_certificate_refused_total", {"reason": "revoked"})
    assert after - before == 2


def test_a_server_revoked_while_the_channel_lives_is_refused_from_the_next_call(site):  # noqa: F811
    revoke(site)  # an empty CRL to begin with

    async def go():
        daemon, servicer = await start(creds(site, "worker-w1"))
        security = creds(site, "agent-a1", crl_file=str(site / "crl.pem"))
        channel = TransportOptions(security=security).aio_channel(f"127.0.0.1:{daemon.port}")
        try:
            first = [await prepare_on(channel) for _ in range(3)]
            handshakes = channel._check.__self__.checks  # one check serves the channel's calls
            revoke(site, "worker-w1")
            t0, refused = time.monotonic(), None
            while time.monotonic() - t0 < 10:
                try:
                    await prepare_on(channel)
                except grpc.aio.AioRpcError as e:
                    refused = e
                    break
                await asyncio.sleep(0.1)
            return first, handshakes, refused, time.monotonic() - t0, servicer.calls
        finally:
            await channel.close()
            await daemon.drain(0.5)

    first, handshakes, refused, after, calls = asyncio.run(go())
    assert first == ["agent/a1/cert"] * 3 and handshakes == 1
    assert refused is not None and refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert after < 5  # the CRL is re-read within a second
    assert calls >= 3


def test_an_agent_whose_worker_is_revoked_runs_its_frames_locally(site):  # noqa: F811
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.models.loader import load_model
    from runtime.wire.codec import get_codec
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    torch.set_num_threads(1)
    loaded = load_model("digits_cnn")
    images = [torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    revoke(site, "worker-w1")
    ws_config = WorkerConfig(listen="127.0.0.1:0", torch_threads=1, ca_file=str(site / "ca.pem"),
                             cert_file=str(site / "worker-w1.pem"), key_file=str(site / "worker-w1.key"))

    async def run(ws, crl_file):
        plan = InitialPlan(loaded.split("pool1"), get_codec("raw"), worker=f"127.0.0.1:{ws.port}")
        security = creds(site, "agent-a1", crl_file=crl_file)
        agent = Agent(loaded, plan, AgentOptions(transport=TransportOptions(security=security), deadline_seconds=30.0,
                                                 connect_timeout=2.0))
        try:
            await agent.start()
            return [r.where for r in await asyncio.gather(*(agent.infer(x) for x in images))]
        finally:
            await agent.close()

    async def go():
        ws = await serve(ws_config)
        try:
            without = await run(ws, "")  # the same agent without the CRL: its frames go to the worker
            admitted = ws.daemon.auth.admitted
            checked = await run(ws, str(site / "crl.pem"))
            return without, checked, ws.daemon.auth.admitted - admitted
        finally:
            await ws.drain_and_stop(0.5)

    without, checked, admitted = asyncio.run(go())
    assert without == ["edge"] * 3
    assert checked == ["local"] * 3 and admitted == 0


def test_the_health_check_cli_refuses_a_revoked_server(site, capsys):  # noqa: F811
    from runtime.cli.main import main

    revoke(site, "worker-w1")

    async def go():
        daemon, _ = await start(creds(site, "worker-w1"))
        try:
            flags = ["--ca-file", str(site / "ca.pem"), "--cert-file", str(site / "agent-a1.pem"),
                     "--key-file", str(site / "agent-a1.key")]
            address = f"127.0.0.1:{daemon.port}"
            ok = await asyncio.to_thread(main, ["health-check", address, "--timeout", "5", *flags])
            refused = await asyncio.to_thread(main, ["health-check", address, "--timeout", "5", *flags,
                                                     "--crl-file", str(site / "crl.pem")])
            return ok, refused
        finally:
            await daemon.drain(0.5)

    ok, refused = asyncio.run(go())
    assert ok == 0 and refused == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
