"""Kubernetes injects <SERVICE>_SERVICE_HOST / _PORT variables for every Service; for the Services
edgesplit-worker, edgesplit-planner and edgesplit-agent they carry the EDGESPLIT_<SECTION>_ prefix.
The strict environment parser must skip them (and still refuse a real typo), and each daemon must
start with them set."""

from __future__ import annotations

import pytest
from conftest import START_TIMEOUT, child_env, cli, wait_for, wait_serving

from planner.config import PlannerConfig
from runtime.agent.config import AgentConfig
from runtime.contracts.config import load_config
from runtime.contracts.errors import InvalidInput
from runtime.worker.config import WorkerConfig


def service_links(section: str) -> dict[str, str]:
    """What kubelet sets for a Service named edgesplit-<section> with ports grpc 50051 and metrics 9101."""
    name = f"EDGESPLIT_{section.upper()}"
    return {
        f"{name}_SERVICE_HOST": "10.96.0.12",
        f"{name}_SERVICE_PORT": "50051",
        f"{name}_SERVICE_PORT_GRPC": "50051",
        f"{name}_SERVICE_PORT_METRICS": "9101",
        f"{name}_PORT": "tcp://10.96.0.12:50051",
        f"{name}_PORT_50051_TCP": "tcp://10.96.0.12:50051",
        f"{name}_PORT_50051_TCP_PROTO": "tcp",
        f"{name}_PORT_50051_TCP_PORT": "50051",
        f"{name}_PORT_50051_TCP_ADDR": "10.96.0.12",
        f"{name}_PORT_9101_UDP_ADDR": "10.96.0.12",
    }


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("cls", "section"), [(WorkerConfig, "worker"), (AgentConfig, "agent"), (PlannerConfig, "planner")])
def test_service_variables_are_not_settings(cls, section):
    env = service_links(section)
    assert load_config(cls, section, env=env) == load_config(cls, section, env={})
    # a real setting next to them still applies, and a typo is still refused
    env[f"EDGESPLIT_{section.upper()}_METRICS_PORT"] = "9999"
    assert load_config(cls, section, env=env).metrics_port == 9999
    with pytest.raises(InvalidInput, match="METRICS_PORTT"):
        load_config(cls, section, env={**env, f"EDGESPLIT_{section.upper()}_METRICS_PORTT": "1"})
    with pytest.raises(InvalidInput, match="SERVICE_HOSTS"):
        load_config(cls, section, env={f"EDGESPLIT_{section.upper()}_SERVICE_HOSTS": "x"})


@pytest.mark.timeout(150)
def test_each_daemon_starts_with_kubernetes_service_variables(reaper, tmp_path):
    env = child_env()
    for section in ("worker", "planner", "agent"):
        env.update(service_links(section))
    worker_port, planner_port = tmp_path / "worker.port", tmp_path / "planner.port"
    worker = reaper.spawn(cli("worker", "--listen", "127.0.0.1:0", "--port-file", str(worker_port),
                              "--torch-threads", "1"), log=tmp_path / "worker.log", env=env)
    planner = reaper.spawn(cli("planner", "serve", "--listen", "127.0.0.1:0", "--port-file", str(planner_port),
                               "--db", str(tmp_path / "p.sqlite")), log=tmp_path / "planner.log", env=env)
    for proc, port_file in ((worker, worker_port), (planner, planner_port)):
        port = wait_for(lambda f=port_file: f.exists() and f.read_text().endswith("\n") and f.read_text().strip(),
                        START_TIMEOUT, f"{port_file.name}", proc)
        wait_serving(f"127.0.0.1:{port}", proc)
    agent = reaper.spawn(cli("agent", "--model", "digits_cnn", "--worker", "", "--source", "synthetic", "--frames", "1",
                             "--torch-threads", "1"), log=tmp_path / "agent.log", env=env)
    assert agent.wait(timeout=120) == 0, (tmp_path / "agent.log").read_text()[-3000:]
    for proc in (worker, planner):
        assert proc.poll() is None
        proc.terminate()
        assert proc.wait(timeout=30) == 0
