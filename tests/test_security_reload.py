"""Client credentials renewed without a restart (issue 10): a long-lived secure channel (the planner
client's, a prober's, a coordinator's; all come from runtime.wire.security.aio_channel) re-reads its
certificate, key, CA and token files when they change, or on SIGHUP, before its next call, and that
call's connection presents the new certificate (the server sees the new identity). A renewal caught
half-written keeps the working credentials."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from runtime.daemon.server import stop_on_signals
from runtime.tools import pki
from runtime.wire import reloading
from runtime.wire.transport import TransportOptions
from tests.security_site import site  # noqa: F401 (fixture)
from tests.test_security import creds, start

pytestmark = pytest.mark.timeout(120)


async def call_as(channel) -> str:
    from runtime.proto.edgesplit.v1 import inference_pb2 as pb
    from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc

    return (await pb_grpc.InferenceStub(channel).Prepare(pb.PrepareRequest(), timeout=5.0)).model_digest


def test_a_renewed_client_certificate_is_used_by_the_next_call_on_the_same_channel(site):  # noqa: F811
    d, ca = site, pki.read(site, "ca")

    async def go():
        daemon, _ = await start(creds(d, "worker-w1"))
        channel = TransportOptions(security=creds(d, "client")).aio_channel(f"127.0.0.1:{daemon.port}")
        try:
            before = await call_as(channel)
            pki.write(pki.issue(ca, "agent", "a1-renewed"), d, "client")  # the renewal, while the process runs
            await asyncio.sleep(reloading.RECHECK_SECONDS + 0.1)
            after = await call_as(channel)
            again = await call_as(channel)
            return before, after, again, channel.reloads
        finally:
            await channel.close()
            await daemon.drain(0.5)

    before, after, again, reloads = asyncio.run(go())
    assert before == "agent/a1/cert"
    assert after == again == "agent/a1-renewed/cert"
    assert reloads == 1


def test_sighup_rereads_credentials_even_when_the_files_look_unchanged(site):  # noqa: F811
    d, ca = site, pki.read(site, "ca")

    async def go():
        daemon, _ = await start(creds(d, "worker-w1"))
        stop_on_signals()  # what the worker, planner and agent run: SIGHUP reloads instead of ending the process
        channel = TransportOptions(security=creds(d, "client")).aio_channel(f"127.0.0.1:{daemon.port}")
        try:
            before = await call_as(channel)
            old = os.stat(d / "client.pem"), os.stat(d / "client.key")
            for _ in range(50):  # a renewal of the same size, its mtimes put back: no file change to notice
                renewed = pki.issue(ca, "agent", "a2")
                if len(renewed.cert_pem) == old[0].st_size and len(renewed.key_pem) == old[1].st_size:
                    break
            else:
                pytest.skip("no renewal of the same size in 50 tries")
            pki.write(renewed, d, "client")
            for path, st in zip((d / "client.pem", d / "client.key"), old, strict=True):
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            await asyncio.sleep(reloading.RECHECK_SECONDS + 0.1)
            unchanged = await call_as(channel)
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.1)
            after = await call_as(channel)
            return before, unchanged, after
        finally:
            await channel.close()
            await daemon.drain(0.5)
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    before, unchanged, after = asyncio.run(go())
    assert before == unchanged == "agent/a1/cert"
    assert after == "agent/a2/cert"


def test_a_half_written_renewal_keeps_the_working_credentials(site):  # noqa: F811
    d, ca = site, pki.read(site, "ca")

    async def go():
        daemon, _ = await start(creds(d, "worker-w1"))
        channel = TransportOptions(security=creds(d, "client")).aio_channel(f"127.0.0.1:{daemon.port}")
        try:
            await call_as(channel)
            (d / "client.pem").write_bytes(pki.issue(ca, "agent", "a3").cert_pem)  # its key not written yet
            await asyncio.sleep(reloading.RECHECK_SECONDS + 0.1)
            t0 = time.monotonic()
            during = await call_as(channel)  # the old connection and credentials go on
            return during, channel.reloads, time.monotonic() - t0
        finally:
            await channel.close()
            await daemon.drain(0.5)

    during, reloads, _ = asyncio.run(go())
    assert during == "agent/a1/cert" and reloads == 0


def test_an_agent_without_a_local_api_survives_sighup_and_rereads_its_credentials(tmp_path):
    """SIGHUP's default action ends a process; the agent asks for a reload instead and runs on."""
    import subprocess
    import sys

    out = tmp_path / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli.main", "agent", "--model", "digits_cnn", "--source",
                             "synthetic", "--frames", "100000", "--fps", "200", "--torch-threads", "1",
                             "--output", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text().count("\n") >= 5):  # running: frames are being written
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)
        lines = out.read_text().count("\n")
        while out.read_text().count("\n") < lines + 20:  # still running after SIGHUP
            assert proc.poll() is None, "the agent ended on SIGHUP"
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "reload requested" in err
