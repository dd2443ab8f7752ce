"""A real Prometheus server scrapes a running worker and agent on loopback; queries return the
expected series, and every PromQL expression of the dashboard and the rules is accepted by it."""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, wait_for
from test_metrics_ops import dashboard_exprs

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus server (Debian package 'prometheus') is not installed")


def metrics_port(log: Path) -> int | None:
    found = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", log.read_text(errors="replace"))
    return int(found.group(1)) if found else None


def query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:  # 400 for a bad expression: the body says why
        return json.loads(e.read())


@pytest.mark.timeout(180)
def test_prometheus_scrapes_worker_and_agent(start_worker, spawn_agent, reaper, tmp_path):
    worker, port = start_worker("--torch-threads", "1", "--metrics-port", "0")
    wport = metrics_port(worker.log_path)
    assert wport, worker.log_path.read_text()[-2000:]
    agent_log = tmp_path / "agent.log"
    agent = spawn_agent("--model", "digits_cnn", "--worker", f"127.0.0.1:{port}", "--source", "synthetic", "--frames",
                        "100000", "--fps", "20", "--torch-threads", "1", "--metrics-port", "0", "--output", "/dev/null",
                        log=agent_log)
    aport = wait_for(lambda: metrics_port(agent_log), 60, "the agent's metrics endpoint", agent)
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{DEPLOY / 'prometheus' / 'rules.yml'}']\n"
        "scrape_configs:\n"
        f"  - {{job_name: edgesplit-worker, static_configs: [{{targets: ['127.0.0.1:{wport}']}}]}}\n"
        f"  - {{job_name: edgesplit-agent, static_configs: [{{targets: ['127.0.0.1:{aport}']}}]}}\n")
    prom = reaper.spawn([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{prom_port}"], log=tmp_path / "prometheus.log")

    def series(expr: str):
        try:
            body = query(prom_port, expr)
        except (OSError, ValueError):  # not listening yet, or 503 "Service Unavailable" while starting
            return None
        return body.get("data", {}).get("result") or None

    edge = wait_for(lambda: series('edgesplit_agent_frames_total{job="edgesplit-agent",where="edge"} > 0'), 90,
                    "edge frames in Prometheus", prom)
    assert float(edge[0]["value"][1]) > 0
    # each target is scraped on its own schedule: wait for the worker's next scrape too
    for expr in ('edgesplit_worker_frames_total{job="edgesplit-worker",model="digits_cnn"} > 0',
                 'edgesplit_build_info{job="edgesplit-worker"}', 'process_cpu_seconds_total{job="edgesplit-agent"}',
                 # pre-initialised: the series exists at 0 before any error
                 'edgesplit_worker_errors_total{code="RESOURCE_EXHAUSTED"} == 0'):
        wait_for(lambda e=expr: series(e), 30, f"series {expr}", prom)
    # every dashboard expression parses and runs (Grafana's variables given plain values)
    for expr in dashboard_exprs():
        concrete = (expr.replace("$__rate_interval", "1m").replace('"$agent"', '".*"').replace('"$worker"', '".*"'))
        if concrete.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        body = query(prom_port, concrete)
        assert body["status"] == "success", (expr, body)
    # the shipped rules load into a real server and evaluate without errors
    with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=10) as resp:
        groups = json.loads(resp.read())["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 7 and all(r.get("health") in ("ok", "unknown") for r in rules), rules
    agent.terminate()
    agent.wait(timeout=30)
