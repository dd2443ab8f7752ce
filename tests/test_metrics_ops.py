"""What operators expect on every /metrics endpoint: process_* metrics, edgesplit_build_info, every
known label combination present (at 0) from the start, every metric an alert names exists, and the
exposition passes promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from planner.metrics import PlannerMetrics
from runtime.agent.metrics import FALLBACK_REASONS, AgentMetrics, reason_label
from runtime.daemon.metrics_http import MetricsEndpoint
from runtime.worker.metrics import WorkerMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROLES = {"worker": WorkerMetrics, "agent": AgentMetrics, "planner": PlannerMetrics}


def scrape(metrics_cls) -> str:
    """The text a Prometheus server reads from a fresh daemon's endpoint (loopback, port 0)."""
    endpoint = MetricsEndpoint(metrics_cls().registry, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=10) as resp:
            return resp.read().decode()
    finally:
        endpoint.close()


def series_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def expositions() -> dict[str, str]:
    return {role: scrape(cls) for role, cls in ROLES.items()}


SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "info": ("_info",)}


def declared_names() -> set[str]:
    """Every series name the daemons can expose, labelled families without a child yet included."""
    from runtime.daemon.metrics_http import add_standard_metrics

    names: set[str] = set()
    for cls in ROLES.values():
        registry = cls().registry
        add_standard_metrics(registry)
        for family in registry.collect():
            names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    return names


@pytest.mark.timeout(30)
def test_process_and_build_info_on_every_endpoint(expositions):
    for role, text in expositions.items():
        names = series_names(text)
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
                     "process_open_fds", "python_info", "edgesplit_build_info"):
            assert name in names, (role, name)
        info = re.search(r'^edgesplit_build_info\{(.*)\} 1\.0$', text, re.M)
        assert info and 'version="' in info.group(1) and 'torch="' in info.group(1), (role, info)


@pytest.mark.timeout(30)
def test_known_label_combinations_exist_before_the_first_event(expositions):
    worker, agent, planner = expositions["worker"], expositions["agent"], expositions["planner"]
    for code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "INVALID_ARGUMENT", "INTERNAL"):
        assert f'edgesplit_worker_errors_total{{code="{code}"}} 0.0' in worker
        assert f'edgesplit_planner_errors_total{{code="{code}"}} 0.0' in planner
        assert f'edgesplit_agent_plan_refusals_total{{code="{code}"}} 0.0' in agent
    for reason in FALLBACK_REASONS:
        assert f'edgesplit_agent_fallbacks_total{{reason="{reason}"}} 0.0' in agent
    assert 'edgesplit_agent_frames_total{where="edge"} 0.0' in agent
    assert 'edgesplit_agent_stage_seconds_count{stage="total"} 0.0' in agent


@pytest.mark.timeout(10)
def test_fallback_reasons_cover_every_label_the_agent_uses():
    reasons = ["deadline exceeded", "given up: the link collapsed", "worker refused: x", "worker unavailable: y", "plan runs every layer on the device",
               "no worker configured", "anything else"]
    assert {reason_label(r) for r in reasons} == set(FALLBACK_REASONS)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (edgesplit_*, process_*), without the recording rules' names."""
    return set(re.findall(r"\b((?:edgesplit|process)_[a-z0-9_]+)", expr))


@pytest.mark.timeout(30)
def test_every_metric_an_alert_or_rule_names_exists():
    import yaml

    exposed = declared_names()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert exprs
    for expr in exprs:
        missing = promql_metric_names(expr) - exposed
        assert not missing, (expr, missing)


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package 'prometheus') is not installed")
def test_promtool_accepts_every_endpoint_and_the_config(expositions):
    for role, text in expositions.items():
        out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, (role, out.stdout + out.stderr)
    out = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def dashboard_exprs() -> list[str]:
    import json

    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "edgesplit.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


@pytest.mark.timeout(30)
def test_every_metric_the_dashboard_names_exists():
    exposed = declared_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, expr
        assert not names - exposed, (expr, names - exposed)


@pytest.mark.timeout(30)
def test_grafana_provisioning_points_at_the_dashboards():
    import yaml

    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "edgesplit.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts


@pytest.mark.timeout(30)
def test_readme_names_every_metric():
    """The README's metrics reference: every metric a worker, agent or planner declares is named there
    (a family written with braces, edgesplit_agent_link_estimate_{a,b}, counts for each member)."""
    readme = (DEPLOY.parent / "README.md").read_text()
    braced = {prefix + "_" + member.strip() for prefix, members in re.findall(r"(edgesplit_[a-z_]+?)_\{([a-z_,]+)\}", readme)
              for member in members.split(",")}
    missing = []
    for cls in ROLES.values():
        for family in cls().registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            if name not in readme and name not in braced:
                missing.append(name)
    assert not missing, missing
