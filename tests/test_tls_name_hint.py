"""A TLS call to a name the server's certificate does not carry says how to fix it (--server-name), on a real
handshake: grpc's own words are matched, so a grpc that changed them fails here."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from runtime.contracts.errors import Unavailable, from_rpc_error
from runtime.tools import pki


def test_a_name_mismatch_names_the_server_name_flag():
    ca = pki.make_ca()
    worker = pki.issue(ca, "worker", "w1", ("localhost",))  # not 127.0.0.1, which the client dials

    async def call() -> grpc.RpcError:
        server = grpc.aio.server()
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(worker.key_pem, worker.cert_pem)]))
        await server.start()
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.cert_pem)) as ch:
                with pytest.raises(grpc.RpcError) as info:
                    await ch.unary_unary("/edgesplit.test.Nothing/Call")(b"", timeout=10)
                return info.value
        finally:
            await server.stop(None)

    err = from_rpc_error(asyncio.run(call()))
    assert isinstance(err, Unavailable)
    assert "Hostname Verification Check failed" in str(err) and "--server-name" in str(err)
