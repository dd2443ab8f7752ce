"""Every shipped deployment starts secure by default (issue 10): manifests, image, units, configs.

Static checks on the rendered Kubernetes manifests, the Dockerfile, compose.yaml and the systemd units,
and one integration test that starts the planner and a worker from the shipped ``deploy/config/*.toml``
with certificates made by ``edgesplit certs`` and probes them the way the manifests do.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planner.config import PlannerConfig
from runtime.agent.config import AgentConfig
from runtime.contracts.config import load_config
from runtime.wire.security import is_loopback
from runtime.worker.config import WorkerConfig
from tests.conftest import child_env, cli, log_text, wait_for
from tests.test_deploy import DEPLOY, pod_templates, rendered_k8s

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl (for 'kubectl kustomize') is not installed")
DAEMONS = {"worker": (WorkerConfig, "worker"), "planner": (PlannerConfig, "planner"), "agent": (AgentConfig, "agent")}
POD = {"$(POD_NAME)": "edgesplit-worker-0", "$(POD_NAMESPACE)": "ns", "$HOSTNAME": "edgesplit-worker-0"}


def expand(word: str) -> str:
    for var, value in POD.items():
        word = word.replace(var, value)
    return word


def daemon_config(words: list[str]):
    """(section, config) of an edgesplit daemon command line; None for other verbs."""
    from runtime.cli.common import config_from_args
    from runtime.cli.main import build_parser

    ns = build_parser().parse_args(words)
    section = "planner" if words[:2] == ["planner", "serve"] else words[0]
    if section not in DAEMONS:
        return None
    cls, name = DAEMONS[section]
    return section, config_from_args(ns, cls, name)


def assert_secure(where: str, cfg) -> None:
    """A daemon binding a network address has TLS with a CA (mTLS), a CRL, and no --insecure."""
    address = getattr(cfg, "listen", "") or getattr(cfg, "serve", "")
    if address and not is_loopback(address):
        assert cfg.cert_file and cfg.key_file and cfg.ca_file, (where, address, "no certificate")
        assert cfg.crl_file, (where, address, "no --crl-file: a revoked certificate would be accepted")
    assert not cfg.insecure, (where, "--insecure")


def probe_words(probe: dict) -> list[str]:
    """The edgesplit arguments of an exec probe (``edgesplit health-check ...`` or ``sh -c 'exec edgesplit ...'``)."""
    assert set(probe) & {"grpc", "httpGet", "tcpSocket"} == set(), probe
    command = probe["exec"]["command"]
    if command[:2] == ["sh", "-c"]:
        command = shlex.split(expand(command[2]))
        command = command[1:] if command[0] == "exec" else command
    assert command[0] == "edgesplit", command
    return command[1:]


@pytest.mark.timeout(120)
@needs_kubectl
def test_every_k8s_daemon_serves_mtls_from_a_mounted_secret_and_probes_with_a_client_cert():
    from runtime.cli.main import build_parser

    docs = rendered_k8s()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    checked = 0
    for name, pod in pod_templates(docs).items():
        secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
        for c in pod["containers"]:
            parsed = daemon_config([expand(a) for a in c["args"]])
            assert parsed is not None, (name, c["args"])
            _, cfg = parsed
            assert_secure(f"{name}/{c['name']}", cfg)
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            for path in (cfg.ca_file, cfg.cert_file, cfg.key_file):
                mount = mounts.get(str(Path(path).parent))
                assert mount and mount["name"] in secrets and mount.get("readOnly"), (name, path)
            crl_mount = mounts.get(str(Path(cfg.crl_file).parent))  # a directory: kubelet's updates reach the file
            crl_volume = next(v for v in pod["volumes"] if crl_mount and v["name"] == crl_mount["name"])
            assert crl_mount.get("readOnly") and "subPath" not in crl_mount, (name, cfg.crl_file)
            assert crl_volume["configMap"]["name"] == "edgesplit-crl", (name, crl_volume)
            listen_port = cfg.listen.rsplit(":", 1)[1]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                words = probe_words(c[kind])
                ns = build_parser().parse_args(words)
                assert words[0] == "health-check" and ns.address == f"127.0.0.1:{listen_port}", (name, kind, words)
                assert (ns.ca_file, ns.cert_file, ns.key_file) == (cfg.ca_file, cfg.cert_file, cfg.key_file), (name, kind)
                assert ns.server_name == "localhost" and ns.timeout < c[kind]["timeoutSeconds"], (name, kind)
            checked += 1
    assert checked == 2
    # worker identity: stable pod names (StatefulSet), the id registered is the id the certificate names
    assert ("StatefulSet", "edgesplit-worker") in kinds and ("Deployment", "edgesplit-worker") not in kinds
    worker = pod_templates(docs)["edgesplit-worker"]["containers"][0]["args"]
    assert worker[worker.index("--worker-id") + 1] == "$(POD_NAME)"
    assert worker[worker.index("--cert-file") + 1].endswith("/worker-$(POD_NAME).pem")
    secret_names = {v["secret"]["secretName"] for p in pod_templates(docs).values() for v in p["volumes"] if "secret" in v}
    assert secret_names == {"edgesplit-planner-tls", "edgesplit-worker-tls"}
    readme = (DEPLOY.parent / "README.md").read_text()
    assert all(f"create secret generic {s}" in readme for s in secret_names), "README gives the Secret commands"
    assert "create configmap edgesplit-crl" in readme, "README gives the CRL's ConfigMap command"


def dockerfile_json(instruction: str) -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{instruction}\s+(\[.*\])\s*$", text, re.M)
    assert match, instruction
    return json.loads(match.group(1))


def test_dockerfile_default_command_uses_the_mounted_certificates():
    cmd = dockerfile_json("CMD")
    _, cfg = daemon_config(cmd)
    assert_secure("Dockerfile CMD", cfg)
    assert all(p.startswith("/etc/edgesplit/pki/") for p in (cfg.ca_file, cfg.cert_file, cfg.key_file, cfg.crl_file))
    health = dockerfile_json(r"HEALTHCHECK.*CMD")
    assert health[:2] == ["edgesplit", "health-check"] and "--cert-file" in health
    assert health[health.index("--cert-file") + 1] == cfg.cert_file


def test_systemd_units_run_the_shipped_configs_with_tls():
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert len(units) == 3
    for unit in units:
        exec_start = re.search(r"^ExecStart=\S+ (.*)$", unit.read_text(), re.M).group(1).split()
        config = Path(exec_start[exec_start.index("--config") + 1])
        section = "planner" if exec_start[0] == "planner" else exec_start[0]
        cls, name = DAEMONS[section]
        cfg = load_config(cls, name, config_file=DEPLOY / "config" / config.name, env={})
        assert_secure(unit.name, cfg)
        assert cfg.ca_file and cfg.cert_file and cfg.key_file, (unit.name, "client side needs the CA and a cert")
        assert all(p.startswith(str(config.parent) + "/pki/") for p in (cfg.ca_file, cfg.cert_file, cfg.key_file))
        assert cfg.crl_file.startswith(str(config.parent) + "/pki/"), (unit.name, "the client side checks servers too")
        assert f"ReadOnlyPaths={config.parent}" in unit.read_text(), unit.name


def test_compose_says_where_it_runs_insecure():
    import yaml

    text = (DEPLOY / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    insecure = [n for n, svc in compose["services"].items() if "--insecure" in json.dumps(svc.get("command", ""))]
    assert insecure, "compose runs its private network without TLS"
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "--insecure" in header and "private" in header and "TLS" in header


# -- integration: the shipped configs start with TLS, probes need the client certificate -----------------


def certs(tmp_path: Path) -> Path:
    pki = tmp_path / "pki"
    steps = [("ca", "--out", str(pki)),
             ("issue", "--ca-dir", str(pki), "--role", "planner", "--id", "planner", "--host", "localhost"),
             ("issue", "--ca-dir", str(pki), "--role", "worker", "--id", "edge-server", "--host", "localhost"),
             ("issue", "--ca-dir", str(pki), "--role", "operator", "--id", "probe"),
             ("revoke", "--ca-dir", str(pki))]  # the empty CRL the shipped configs name
    for step in steps:
        out = subprocess.run(cli("certs", *step), capture_output=True, text=True, timeout=60, env=child_env())
        assert out.returncode == 0, out.stdout + out.stderr
    return pki


def health(port: int, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli("health-check", f"127.0.0.1:{port}", "--timeout", "3", *flags), capture_output=True,
                          text=True, timeout=30, env=child_env())


def start(reaper, tmp_path: Path, role: str, env: dict[str, str], *flags: str):
    """A daemon from deploy/config/ROLE.toml on the config's own host (port 0); (proc, port)."""
    cls, section = DAEMONS[role]
    listen_host = load_config(cls, section, config_file=DEPLOY / "config" / f"{section}.toml", env={}).listen.rsplit(":", 1)[0]
    assert not is_loopback(listen_host + ":1"), "the shipped config binds the network: TLS is what lets it start"
    port_file = tmp_path / f"{role}.port"
    verb = ("planner", "serve") if role == "planner" else (role,)
    argv = cli(*verb, "--config", str(DEPLOY / "config" / f"{section}.toml"), "--listen", f"{listen_host}:0",
               "--port-file", str(port_file), "--metrics-port", "-1", *flags)
    proc = reaper.spawn(argv, log=tmp_path / f"{role}.log", env={**child_env(), **env})

    def port() -> int | None:
        text = port_file.read_text() if port_file.exists() else ""
        return int(text) if text.endswith("\n") and text.strip().isdigit() else None

    return proc, wait_for(port, 90, f"the {role}'s port file", proc)


def tls_env(section: str, pki: Path, stem: str) -> dict[str, str]:
    prefix = f"EDGESPLIT_{section.upper()}_"
    return {prefix + "CA_FILE": str(pki / "ca.pem"), prefix + "CERT_FILE": str(pki / f"{stem}.pem"),
            prefix + "KEY_FILE": str(pki / f"{stem}.key"), prefix + "CRL_FILE": str(pki / "crl.pem")}


def client_flags(pki: Path, stem: str) -> tuple[str, ...]:
    """What the manifests' probes pass: the daemon's own certificate, the name 'localhost' it carries."""
    return ("--server-name", "localhost", "--ca-file", str(pki / "ca.pem"), "--cert-file", str(pki / f"{stem}.pem"),
            "--key-file", str(pki / f"{stem}.key"))


def assert_probe_needs_the_client_cert(port: int, pki: Path, stem: str, proc) -> None:
    client = client_flags(pki, stem)
    wait_for(lambda: health(port, *client).returncode == 0, 60, "health-check SERVING with the client cert", proc)
    ok = health(port, *client)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr + log_text(proc)
    no_cert = health(port, "--server-name", "localhost", "--ca-file", str(pki / "ca.pem"))
    assert no_cert.returncode != 0 and "SERVING" not in no_cert.stdout, no_cert.stdout
    plaintext = health(port)
    assert plaintext.returncode != 0 and "SERVING" not in plaintext.stdout, plaintext.stdout


@pytest.mark.timeout(240)
def test_shipped_configs_start_with_tls_and_probes_need_the_client_cert(reaper, tmp_path):
    pki = certs(tmp_path)
    planner_env = tls_env("planner", pki, "planner-planner")
    proc, port = start(reaper, tmp_path, "planner", planner_env, "--db", str(tmp_path / "planner.sqlite"))
    assert_probe_needs_the_client_cert(port, pki, "planner-planner", proc)
    argv = ["health-check", f"127.0.0.1:{port}", *client_flags(pki, "operator-probe")]  # any CA-signed client
    t0 = time.monotonic()
    probe = subprocess.run([sys.executable, "-c", f"import sys; from runtime.cli.main import main; rc = main({argv!r}); "
                            "print('torch' in sys.modules); sys.exit(rc)"], capture_output=True, text=True, timeout=30,
                           env=child_env())
    elapsed = time.monotonic() - t0
    assert probe.returncode == 0 and probe.stdout.strip().endswith("False"), probe.stdout + probe.stderr
    assert elapsed < 5, f"a probe took {elapsed:.1f} s"  # about 0.2 s alone; generous on a shared machine

    # the worker's shipped config, its model loads and its planner/profiles switched off (no profile here)
    worker_env = {**tls_env("worker", pki, "worker-edge-server"), "EDGESPLIT_WORKER_PRELOAD": "",
                  "EDGESPLIT_WORKER_TLS": "", "EDGESPLIT_WORKER_PLANNER": "", "EDGESPLIT_WORKER_PROFILES": "",
                  "EDGESPLIT_WORKER_TORCH_THREADS": "1"}
    wproc, wport = start(reaper, tmp_path, "worker", worker_env)
    assert_probe_needs_the_client_cert(wport, pki, "worker-edge-server", wproc)


@pytest.mark.timeout(60)
def test_shipped_planner_config_without_certificates_refuses_to_start(tmp_path):
    env = {**child_env(), "EDGESPLIT_PLANNER_CERT_FILE": "", "EDGESPLIT_PLANNER_KEY_FILE": "",
           "EDGESPLIT_PLANNER_CRL_FILE": ""}
    out = subprocess.run(cli("planner", "serve", "--config", str(DEPLOY / "config" / "planner.toml"), "--listen",
                             "0.0.0.0:0", "--db", str(tmp_path / "p.sqlite"), "--metrics-port", "-1"),
                         capture_output=True, text=True, timeout=50, env=env)
    assert out.returncode != 0 and "refusing to serve 0.0.0.0:0 without TLS" in out.stderr, out.stderr
