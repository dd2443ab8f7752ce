"""The CLI sets gRPC's C-core experiments (EventEngine client and listener off) before grpc is first imported,
leaves a user's own GRPC_EXPERIMENTS alone, and TLS / mTLS daemons and frames work with the setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import runtime.cli
from tests.conftest import child_env

pytestmark = pytest.mark.timeout(150)
REPO = Path(__file__).resolve().parent.parent

# records GRPC_EXPERIMENTS as it is when grpc is first imported, then imports the CLI the way `edgesplit` does
FIRST_IMPORT = r'''
import builtins, json, os, sys
seen = []
real = builtins.__import__
def hook(name, *a, **k):
    if name.split(".")[0] == "grpc" and not seen:
        seen.append(os.environ.get("GRPC_EXPERIMENTS"))
    return real(name, *a, **k)
builtins.__import__ = hook
import importlib
importlib.import_module(sys.argv[1] if len(sys.argv) > 1 else "runtime.cli.main")
builtins.__import__ = real
print(json.dumps({"at_grpc_import": seen, "grpc": "grpc" in sys.modules, "env": os.environ.get("GRPC_EXPERIMENTS")}))
'''


def first_import(module: str = "runtime.cli.main", **env: str) -> dict:
    base = {k: v for k, v in child_env().items() if k != runtime.cli.GRPC_EXPERIMENTS_ENV}
    out = subprocess.run([sys.executable, "-c", FIRST_IMPORT, module], cwd=REPO, env={**base, **env}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_cli_sets_the_default_before_grpc_is_first_imported():
    got = first_import()
    assert got == {"at_grpc_import": ["-event_engine_client,-event_engine_listener"], "grpc": True,
                   "env": "-event_engine_client,-event_engine_listener"}
    assert runtime.cli.GRPC_EXPERIMENTS_DEFAULT == "-event_engine_client,-event_engine_listener"


@pytest.mark.parametrize("module", ["runtime.tools.netem", "runtime.measure.agent_cpu", "runtime.tools.dpfp_bench"])
def test_tools_and_measurements_run_as_the_daemons_do(module):
    """`python -m runtime.tools.X` / `runtime.measure.X` do not import the CLI: their packages apply the same default,
    so what they measure runs with the daemons' gRPC (before: EventEngine on in the tool, off in the CLI's children)."""
    default = "-event_engine_client,-event_engine_listener"
    got = first_import(module)
    assert got["env"] == default and got["at_grpc_import"] == ([default] if got["grpc"] else []), got
    got = first_import(module, GRPC_EXPERIMENTS="")
    assert got["env"] == "" and got["at_grpc_import"] == ([""] if got["grpc"] else []), got


@pytest.mark.parametrize("value", ["", "event_engine_client,event_engine_listener", "-event_engine_client"])
def test_a_users_own_value_is_kept_even_empty(value):
    assert first_import(GRPC_EXPERIMENTS=value)["at_grpc_import"] == [value]


# mTLS and TLS + token through the daemon scaffold, and a real worker and agent exchanging frames over mTLS, in a
# process that imported the CLI first (so grpc runs with the CLI's experiments), using test_security's own tests
MTLS = r'''
import datetime, os, sys, tempfile
from pathlib import Path
import runtime.cli  # noqa: F401  (sets GRPC_EXPERIMENTS before grpc's import below)
assert os.environ["GRPC_EXPERIMENTS"] == sys.argv[1], os.environ.get("GRPC_EXPERIMENTS")
from runtime.tools import pki
from tests import test_security as ts

d = Path(tempfile.mkdtemp())
ca = pki.make_ca()
pki.write(ca, d, "ca")
pki.write(pki.issue(ca, "worker", "w1", ("127.0.0.1", "localhost")), d, "worker-w1")
pki.write(pki.issue(ca, "agent", "a1"), d, "agent-a1")
pki.write(pki.issue(ca, "operator", "alice"), d, "operator-alice")
other = pki.make_ca("another CA")
pki.write(other, d, "other-ca")
pki.write(pki.issue(other, "agent", "a1"), d, "stranger")
ts.test_mtls_admits_site_certificates_and_exposes_the_identity(d)
for client in ("no certificate", "wrong CA", "plain channel"):
    ts.test_mtls_refuses_at_the_handshake_with_no_handler_call(d, client)
ts.test_client_refuses_a_server_of_another_ca(d)
table = d / "tokens"
table.write_text("agent a7 " + ts.token_digest("g" * 32) + "\n")
(d / "good.token").write_text("g" * 32 + "\n")
(d / "bad.token").write_text("b" * 32 + "\n")
ts.test_tokens_missing_or_bad_are_unauthenticated(d, (table, {"good": d / "good.token", "bad": d / "bad.token"}), True)
ts.test_agent_and_worker_over_mtls_end_to_end(d)
print("mtls ok")
'''


def test_tls_and_mtls_work_with_the_clis_experiments():
    env = {k: v for k, v in child_env().items() if k != runtime.cli.GRPC_EXPERIMENTS_ENV}
    out = subprocess.run([sys.executable, "-c", MTLS, runtime.cli.GRPC_EXPERIMENTS_DEFAULT], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("mtls ok"), out.stderr[-3000:]



def test_help_says_so():
    from runtime.cli.main import build_parser

    text = " ".join(build_parser(("models",)).format_help().split())
    assert "GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener" in text and "set it empty" in text
