"""The ``edgesplit`` command line: models, health-check, --help, errors (mostly in-process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, child_env, cli, free_port

from runtime.cli.main import main

BUNDLED = ["densenet169", "digits_cnn", "efficientnet_lite0", "mobilenet_v2", "resnet18", "resnet50", "vgg16"]


@pytest.mark.timeout(60)
def test_models_lists_all_bundled(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in BUNDLED:
        assert name in out
    assert "file.py:factory" in out

    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["name"] for r in rows) == BUNDLED
    assert all(r["input_size"] == ([28, 28] if r["name"] == "digits_cnn" else [224, 224]) for r in rows)


@pytest.mark.timeout(60)
def test_models_split_points_json(capsys):
    assert main(["models", "resnet18", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "resnet18"
    assert len(data["digest"]) == 16
    points = data["split_points"]
    assert [p["index"] for p in points] == list(range(len(points)))
    assert points[0]["name"] == "input" and points[-1]["name"] == "output"
    assert points[0]["out_shape"] == [1, 3, 224, 224]
    assert points[-1]["out_shape"] == [1, 1000]
    for p in points:
        assert set(p) >= {"index", "name", "out_shape", "fp32_bytes"}
        n = 4
        for d in p["out_shape"]:
            n *= d
        assert p["fp32_bytes"] == n
    assert "add_6" in [p["name"] for p in points]

    assert main(["models", "resnet18"]) == 0
    text = capsys.readouterr().out
    assert "valid split points" in text and "add_6" in text and "*" in text


@pytest.mark.timeout(30)
def test_unknown_model_exit_2_names_bundled(capsys):
    assert main(["models", "no_such_net"]) == 2
    err = capsys.readouterr().err
    assert "no_such_net" in err
    for name in BUNDLED:
        assert name in err


@pytest.mark.timeout(60)
def test_unknown_model_subprocess_exit_code():
    """The console entry point itself exits 2 (sys.exit(main()))."""
    p = subprocess.run(cli("agent", "--model", "no_such_net", "--worker", "", "--source", "synthetic", "--frames", "1"),
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "no_such_net" in p.stderr and "resnet18" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.timeout(60)
def test_bad_split_is_an_error_not_a_traceback(capsys):
    rc = main(["agent", "--model", "resnet18", "--split", "no_such_layer", "--worker", "", "--source", "synthetic",
               "--frames", "1"])
    assert rc == 2
    assert "no_such_layer" in capsys.readouterr().err


@pytest.mark.timeout(90)
def test_health_check(worker, capsys):
    _, port = worker
    assert main(["health-check", f"127.0.0.1:{port}"]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert main(["health-check", f"127.0.0.1:{port}", "--service", "edgesplit.v1.Inference"]) == 0
    capsys.readouterr()
    # an unknown service name is NOT_FOUND, not SERVING
    assert main(["health-check", f"127.0.0.1:{port}", "--service", "no.such.Service", "--timeout", "2"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    closed = free_port()
    assert main(["health-check", f"127.0.0.1:{closed}", "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err, err


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "argv, expect",
    [
        (["worker"], ["--listen", "(default: '127.0.0.1:50051')", "--max-queue", "(default: 8)", "--grace-seconds"]),
        (["agent"], ["--worker", "--deadline-seconds", "(default: 2.0)", "--codec", "(default: 'int8+lz4')",
                     "--no-summary", "(default: True)"]),
        (["print-config", "worker"], ["--max-queue", "(default: 8)"]),
        (["print-config", "agent"], ["--window", "(default: 4)"]),
        (["health-check"], ["--timeout", "(default: 3)"]),
        (["demo"], ["--model", "(default: efficientnet_lite0)"]),
        (["bench"], ["--frames", "(default: 60)"]),
        (["models"], ["--json"]),
        (["planner", "serve"], ["--switch-gain", "(0.10 = 10 %)", "(default: 0.1)"]),
    ],
)
def test_help_shows_defaults(argv, expect, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for text in expect:
        assert text in out, (text, out)
    assert "(default: None)" not in out


@pytest.mark.timeout(30)
def test_bad_usage_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["worker", "--max-queue", "lots"])
    assert e.value.code == 2
    assert "max-queue" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


@pytest.mark.timeout(60)
def test_one_module_per_verb_and_light_imports():
    """Each verb is a module of runtime.cli registered from the root's list; importing the root and
    every verb module loads no torch (heavy imports wait for add_parser or the command)."""
    code = ("import importlib, sys\n"
            "from runtime.cli.main import VERBS\n"
            "mods = [importlib.import_module('runtime.cli.' + v) for v in VERBS]\n"
            "assert all(callable(m.add_parser) for m in mods)\n"
            "assert 'torch' not in sys.modules, 'torch imported by a runtime.cli module at import'\n"
            "from runtime.cli.main import build_parser\n"
            "sub = build_parser()._subparsers._group_actions[0]\n"
            "print(' '.join(sub.choices))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["models", "worker", "agent", "submit", "print-config", "health-check", "demo", "bench", "bench-scenarios", "tl",
                                  "plan", "import-peers", "plan-check", "planner", "profile", "certs", "bench-planner-fleet"]
