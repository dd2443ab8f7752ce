"""Worker -> worker chaining under mTLS (issue 10, "Transport security on every endpoint ... worker ->
worker chaining"): the agent sends to the edge worker with its agent certificate, the edge forwards to
the cloud worker presenting its own worker certificate, and the result equals the unsplit model's.
With ``--crl-file`` on the edge, a cloud worker whose certificate is revoked is never called: the
edge's forward is refused before its stream opens (runtime.wire.crl), the frames run on the board,
and the cloud admits no call."""

from __future__ import annotations

import asyncio

import pytest
import torch

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.models.loader import load_model
from runtime.tools import pki
from runtime.wire import filewatch
from runtime.wire.chain import Hop
from runtime.wire.codec import get_codec
from runtime.wire.transport import TransportOptions
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve
from tests.test_security import creds

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(240)]

MODEL, SPLIT, END = "resnet18", "add_2", "add_6"  # board: .. add_2; edge: add_2 .. add_6; cloud: add_6 ..


@pytest.fixture()
def chain_site(tmp_path):
    ca = pki.make_ca()
    pki.write(ca, tmp_path, "ca")
    for ident in ("edge", "cloud"):
        pki.write(pki.issue(ca, "worker", ident, ("127.0.0.1",)), tmp_path, f"worker-{ident}")
    pki.write(pki.issue(ca, "agent", "a1"), tmp_path, "agent-a1")
    pki.revoke(ca, tmp_path / "crl.pem", [])
    return tmp_path


def worker_config(d, stem: str, **kw) -> WorkerConfig:
    return WorkerConfig(listen="127.0.0.1:0", torch_threads=1, ca_file=str(d / "ca.pem"), cert_file=str(d / f"{stem}.pem"),
                        key_file=str(d / f"{stem}.key"), crl_file=str(d / "crl.pem"), **kw)


async def run_agent(loaded, d, edge, cloud, images):
    plan = InitialPlan(loaded.split(SPLIT), get_codec("raw"), worker=f"127.0.0.1:{edge.port}", end_split=END,
                       next_hops=[Hop(f"127.0.0.1:{cloud.port}", codec="raw")])
    security = creds(d, "agent-a1", crl_file=str(d / "crl.pem"))
    agent = Agent(loaded, plan, AgentOptions(transport=TransportOptions(security=security), deadline_seconds=60.0,
                                             connect_timeout=5.0))
    try:
        await agent.start()
        return await asyncio.gather(*(agent.infer(x) for x in images))
    finally:
        await agent.close()


def test_a_chain_runs_over_mtls_and_never_calls_a_revoked_next_tier(chain_site):
    d = chain_site
    loaded = load_model(MODEL)
    images = [torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.inference_mode():
        expected = [loaded.full(x) for x in images]

    async def go():
        cloud = await serve(worker_config(d, "worker-cloud", preload=(f"{MODEL}@{END}",)))
        edge = await serve(worker_config(d, "worker-edge", next_tiers=(f"127.0.0.1:{cloud.port}",),
                                         forward_deadline_seconds=60.0))
        try:
            chained = await run_agent(loaded, d, edge, cloud, images)
            admitted = cloud.daemon.auth.admitted
            pki.revoke(pki.read(d, "ca"), d / "crl.pem", [(d / "worker-cloud.pem").read_bytes()])
            filewatch.request_reload()  # as SIGHUP does; else the CRL is read again within a second
            # a fresh edge (a forward stream already open is not re-checked: SECURITY.md)
            edge2 = await serve(worker_config(d, "worker-edge", next_tiers=(f"127.0.0.1:{cloud.port}",),
                                              forward_deadline_seconds=60.0, forward_connect_timeout_seconds=2.0))
            try:
                refused = await run_agent(loaded, d, edge2, cloud, images)
            finally:
                await edge2.drain_and_stop(0.5)
            return chained, admitted, refused, cloud.daemon.auth.admitted - admitted
        finally:
            await edge.drain_and_stop(0.5)
            await cloud.drain_and_stop(0.5)

    chained, admitted, refused, admitted_after = asyncio.run(go())
    print(f"revoked next tier: {refused[0].fallback_reason}")
    for r, want in zip(chained, expected, strict=True):
        assert r.where == "edge", r.fallback_reason
        assert torch.equal(r.output, want)
        assert r.times["next1_tail"] > 0  # the cloud ran the rest
    assert admitted >= 1  # the edge's forward stream (and Prepare) reached the cloud under mTLS
    for r, want in zip(refused, expected, strict=True):
        assert r.where == "local", r.fallback_reason
        assert torch.equal(r.output, want)
    assert admitted_after == 0
