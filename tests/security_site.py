"""A site PKI made inside the test (issue 10: no certificate comes from outside): the CA, a worker
certificate for 127.0.0.1 and agent certificates, written with ``edgesplit certs``' own code
(runtime.tools.pki). Shared by the reload, revocation and server-CRL tests; import the fixture with
``from tests.security_site import site  # noqa: F401``."""

from __future__ import annotations

import pytest

from runtime.tools import pki


@pytest.fixture()
def site(tmp_path):
    """tmp_path holding ca.pem/.key, worker-w1 (SAN 127.0.0.1), agent-a1, agent-a2 and client (agent a1,
    the stem a test may renew); ``pki.read(site, "ca")`` gives the CA back."""
    ca = pki.make_ca()
    pki.write(ca, tmp_path, "ca")
    pki.write(pki.issue(ca, "worker", "w1", ("127.0.0.1",)), tmp_path, "worker-w1")
    for ident in ("a1", "a2"):
        pki.write(pki.issue(ca, "agent", ident), tmp_path, f"agent-{ident}")
    pki.write(pki.issue(ca, "agent", "a1"), tmp_path, "client")
    return tmp_path
