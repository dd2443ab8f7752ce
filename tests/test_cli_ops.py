"""The command line as operators meet it: a probe that loads no torch, --version, --log-level
anywhere, clear errors for bad addresses (subprocesses on loopback)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, child_env, free_port


def run_code(code: str, timeout: float = 50) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(60)
def test_health_check_loads_no_torch():
    """A Kubernetes probe or a Docker HEALTHCHECK runs this every few seconds: only grpc, no models."""
    code = ("import sys\n"
            "from runtime.cli.main import main\n"
            f"rc = main(['--log-level', 'ERROR', 'health-check', '127.0.0.1:{free_port()}', '--timeout', '0.5'])\n"
            "assert rc == 2, rc\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'runtime.models', 'runtime.worker.config') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    out = run_code(code)
    assert out.returncode == 0, out.stderr
    assert "UNAVAILABLE" in out.stderr
