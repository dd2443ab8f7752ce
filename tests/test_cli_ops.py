"""The command line as operators meet it: a probe that loads no torch, --version, --log-level
anywhere, clear errors for bad addresses (subprocesses on loopback)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, child_env, cli, free_port, wait_for

from runtime.cli.logs import JsonFormatter
from runtime.contracts.errors import InvalidInput
from runtime.daemon.listen import check_listen
from runtime.daemon.server import Daemon, DaemonOptions


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


@pytest.mark.timeout(30)
def test_version_and_log_flags_after_the_subcommand():
    out = subprocess.run(cli("--version"), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and re.fullmatch(r"edgesplit \d+\.\d+\.\d+\S*\n", out.stdout), out
    # after the verb, and after a nested verb; JSON lines carry ts, level, logger, msg
    out = subprocess.run(cli("models", "digits_cnn", "--log-level", "DEBUG", "--log-format", "json"), cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines), out.stderr
    assert any(line["logger"] == "runtime.models.loader" and "digits_cnn" in line["msg"] for line in lines)
    out = subprocess.run(cli("planner", "serve", "--log-level", "WARNING", "--help"), cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--log-format" in out.stdout


@pytest.mark.timeout(10)
def test_json_formatter_keeps_frame_and_plan_ids_and_tracebacks():
    formatter = JsonFormatter()
    record = logging.LogRecord("runtime.agent.client", logging.WARNING, __file__, 1, "frame %d late", (7,), None)
    record.frame, record.plan = 7, 3
    line = json.loads(formatter.format(record))
    assert line["msg"] == "frame 7 late" and line["frame"] == 7 and line["plan"] == 3 and line["level"] == "WARNING"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(formatter.format(record))["exc"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("listen", "error", "message"), [
    (":50051", InvalidInput, "has no host: give 0.0.0.0:50051"),
    ("127.0.0.1", InvalidInput, "needs a port"),
    ("unix:/no/such/dir/agent.sock", OSError, "could not bind unix:/no/such/dir/agent.sock: directory /no/such/dir does not exist"),
])
def test_bad_listen_addresses_are_one_clear_line(listen, error, message):
    with pytest.raises(error, match=re.escape(message)):
        check_listen(listen)
    check_listen("127.0.0.1:0")
    check_listen("unix:" + str(REPO / "x.sock"))  # an existing directory


@pytest.mark.timeout(60)
def test_cli_reports_a_bad_listen_address_without_a_traceback(tmp_path):
    out = subprocess.run(cli("planner", "serve", "--listen", ":50061", "--db", str(tmp_path / "p.sqlite")), cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=50)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "has no host: give 0.0.0.0:50061" in out.stderr


@pytest.mark.timeout(30)
def test_a_second_daemon_on_a_port_in_use_is_refused():
    """No SO_REUSEPORT: gRPC would otherwise let two workers share a port and split connections."""

    async def main():
        first = Daemon(DaemonOptions(listen="127.0.0.1:0"))
        port = first.bind(lambda server: None)
        second = Daemon(DaemonOptions(listen=f"127.0.0.1:{port}"))
        try:
            with pytest.raises(OSError, match="another process listening"):
                second.bind(lambda server: None)
        finally:
            await first.server.stop(None)
            await second.server.stop(None)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_output_piped_into_head_ends_quietly():
    """`edgesplit models | head -1` where head has already exited: the write meets a closed pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    proc = subprocess.Popen(cli("models"), cwd=REPO, env=child_env(), stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    err = proc.communicate(timeout=50)[1].decode()
    assert proc.returncode == 141 and "Traceback" not in err and "Broken pipe" not in err, (proc.returncode, err)


@pytest.mark.timeout(120)
def test_submit_is_the_local_api_client(reaper, tmp_path):
    from PIL import Image

    sock = tmp_path / "agent.sock"
    agent = reaper.spawn(cli("agent", "--model", "digits_cnn", "--worker", "", "--source", "none", "--serve",
                             f"unix:{sock}", "--torch-threads", "1"), log=tmp_path / "agent.log")
    wait_for(lambda: sock.exists(), 60, "the local API socket", agent)
    Image.new("L", (28, 28), 0).save(tmp_path / "black.png")
    (tmp_path / "not.png").write_bytes(b"no image here")
    out = subprocess.run(cli("submit", f"unix:{sock}", str(tmp_path / "black.png"), "--json"), cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["where"] == "local" and 0 <= row["class_index"] < 10 and row["image"].endswith("black.png")
    out = subprocess.run(cli("submit", f"unix:{sock}", str(tmp_path / "not.png")), cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "INVALID_ARGUMENT" in out.stderr and "not.png" in out.stderr, out.stderr
    assert "<" not in out.stderr and "Traceback" not in out.stderr  # a message, not an object's repr
    agent.terminate()
    assert agent.wait(timeout=30) == 0


@pytest.mark.timeout(60)
def test_every_option_has_one_help_and_at_most_one_default():
    import argparse

    from runtime.cli.main import build_parser

    problems = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.option_strings and action.dest not in ("help", "version"):
                text = formatter._expand_help(action) if action.help else ""
                if not text or text.count("(default") > 1:
                    problems.append(f"{path} {action.option_strings[0]}: {text!r}")

    walk(build_parser(), "edgesplit")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
def test_tl_train_transform_reports_its_fit_not_a_missing_loss(tmp_path):
    out = subprocess.run(cli("tl", "train", "--model", "digits_cnn", "--split", "pool1", "--kind", "transform",
                             "--pool-size", "16", "--holdout-images", "4", "--out", str(tmp_path)), cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert "None" not in out.stdout and "fitted on 16 pooled features" in out.stdout, out.stdout


@pytest.mark.timeout(60)
def test_help_loads_no_torch():
    """`edgesplit --help` builds every verb's parser: configuration classes and choices, not models."""
    code = ("import sys\n"
            "from runtime.cli.main import build_parser\n"
            "build_parser().format_help()\n"
            "assert 'torch' not in sys.modules, 'torch imported while building the parser'\n")
    out = run_code(code)
    assert out.returncode == 0, out.stderr


@pytest.mark.timeout(90)
def test_json_logs_carry_frame_and_plan_ids():
    out = subprocess.run(cli("agent", "--model", "digits_cnn", "--worker", "", "--source", "synthetic", "--frames", "2",
                             "--torch-threads", "1", "--no-summary", "--log-level", "DEBUG", "--log-format", "json"),
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=80)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    local = [line for line in lines if "runs locally" in line["msg"]]
    assert sorted(line["frame"] for line in local) == [0, 1] and all(line["plan"] == 0 for line in local), lines
