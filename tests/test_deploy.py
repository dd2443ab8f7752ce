"""The shipped deployment files are valid: configs load, manifests build."""

from __future__ import annotations

import shutil
import subprocess
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
    assert "kind: Deployment" in out.stdout and "grpc:" in out.stdout and "kind: StatefulSet" in out.stdout


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
