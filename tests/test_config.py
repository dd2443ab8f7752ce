"""Configuration precedence: defaults < TOML [section] < EDGESPLIT_<SECTION>_<FIELD> < flags."""

from __future__ import annotations

import os
import sys

import pytest

from runtime.agent.config import AgentConfig
from runtime.cli.main import main
from runtime.contracts.config import load_config, to_toml
from runtime.contracts.errors import InvalidInput
from runtime.worker.config import WorkerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("EDGESPLIT_"):
            monkeypatch.delenv(k)


@pytest.fixture
def toml(tmp_path):
    def write(text: str):
        path = tmp_path / "edgesplit.toml"
        path.write_text(text)
        return path

    return write


def test_defaults():
    w = load_config(WorkerConfig, "worker", env={})
    assert w == WorkerConfig()
    assert w.max_queue == 8 and w.listen == "127.0.0.1:50051" and w.models == ()
    a = load_config(AgentConfig, "agent", env={})
    assert a == AgentConfig()
    assert a.summary is True and a.codec == "int8+lz4"


def test_precedence_each_layer(toml):
    f = toml('[worker]\nmax_queue = 3\nmax_concurrency = 2\ngrace_seconds = 4.5\nlisten = "0.0.0.0:7000"\n'
             '[agent]\nwindow = 9\n')
    # TOML over defaults; other sections ignored
    w = load_config(WorkerConfig, "worker", config_file=f, env={})
    assert (w.max_queue, w.max_concurrency, w.grace_seconds, w.listen) == (3, 2, 4.5, "0.0.0.0:7000")
    assert w.torch_threads == WorkerConfig().torch_threads
    # env over TOML (and over defaults); other components' variables ignored
    env = {"EDGESPLIT_WORKER_MAX_QUEUE": "5", "EDGESPLIT_WORKER_TORCH_THREADS": "2", "EDGESPLIT_AGENT_WINDOW": "1",
           "UNRELATED": "x"}
    w = load_config(WorkerConfig, "worker", config_file=f, env=env)
    assert (w.max_queue, w.torch_threads, w.max_concurrency) == (5, 2, 2)
    # flags over env; None means "flag not given"
    w = load_config(WorkerConfig, "worker", config_file=f, env=env,
                    overrides={"max_queue": 7, "max_concurrency": None, "listen": None})
    assert (w.max_queue, w.torch_threads, w.max_concurrency, w.listen) == (7, 2, 2, "0.0.0.0:7000")
    a = load_config(AgentConfig, "agent", config_file=f, env=env)
    assert a.window == 1


def test_types_from_toml_and_env(toml):
    f = toml('[agent]\nsummary = false\ndeadline-seconds = 0.5\n[worker]\nmodels = ["a.py:f", "b.py:g"]\n')
    a = load_config(AgentConfig, "agent", config_file=f, env={})
    assert a.summary is False and a.deadline_seconds == 0.5  # dashed keys accepted
    a = load_config(AgentConfig, "agent", config_file=f, env={"EDGESPLIT_AGENT_SUMMARY": "yes",
                                                              "EDGESPLIT_AGENT_DEADLINE_SECONDS": "1.25"})
    assert a.summary is True and a.deadline_seconds == 1.25
    w = load_config(WorkerConfig, "worker", config_file=f, env={})
    assert w.models == ("a.py:f", "b.py:g")
    w = load_config(WorkerConfig, "worker", config_file=f, env={"EDGESPLIT_WORKER_MODELS": "c.py:h, d.py:i"})
    assert w.models == ("c.py:h", "d.py:i")
    w = load_config(WorkerConfig, "worker", config_file=f, env={}, overrides={"models": ("e.py:j",)})
    assert w.models == ("e.py:j",)


def test_print_config_precedence(toml, monkeypatch, capsys):
    f = toml('[worker]\nmax_queue = 1\nmax_concurrency = 2\ntorch_threads = 3\nmodels = ["x.py:f"]\n')
    monkeypatch.setenv("EDGESPLIT_WORKER_MAX_CONCURRENCY", "5")
    monkeypatch.setenv("EDGESPLIT_WORKER_MAX_QUEUE", "4")
    assert main(["print-config", "worker", "--config", str(f), "--max-queue", "3"]) == 0
    out = capsys.readouterr().out
    data = tomllib.loads(out)["worker"]  # the output is itself valid TOML
    assert data["max_queue"] == 3  # flag
    assert data["max_concurrency"] == 5  # env
    assert data["torch_threads"] == 3  # TOML
    assert data["grace_seconds"] == 10.0  # default
    assert data["models"] == ["x.py:f"]
    assert "# " in out  # help comments
    # and it round-trips through load_config
    g = toml(out)
    monkeypatch.delenv("EDGESPLIT_WORKER_MAX_CONCURRENCY")
    monkeypatch.delenv("EDGESPLIT_WORKER_MAX_QUEUE")
    w = load_config(WorkerConfig, "worker", config_file=g, env={})
    assert (w.max_queue, w.max_concurrency, w.torch_threads, w.models) == (3, 5, 3, ("x.py:f",))


def test_print_config_agent_flags(capsys):
    assert main(["print-config", "agent", "--no-summary", "--window", "2", "--worker", ""]) == 0
    data = tomllib.loads(capsys.readouterr().out)["agent"]
    assert data["summary"] is False and data["window"] == 2 and data["worker"] == ""


def test_to_toml_roundtrip(toml):
    cfg = WorkerConfig(models=("a.py:f",), listen='weird"host:1', grace_seconds=2.5)
    back = load_config(WorkerConfig, "worker", config_file=toml(to_toml(cfg, "worker")), env={})
    assert back == cfg


def test_unknown_toml_key(toml):
    f = toml("[worker]\nmax_queeu = 3\n")
    with pytest.raises(InvalidInput, match="max_queeu"):
        load_config(WorkerConfig, "worker", config_file=f, env={})


@pytest.mark.parametrize(
    "body, key",
    [
        ('max_queue = "lots"', "max_queue"),
        ("max_queue = 3.7", "max_queue"),
        ("max_queue = true", "max_queue"),
        ('grace_seconds = "soon"', "grace_seconds"),
        ("listen = [1, 2]", "listen"),
        ("models = 5", "models"),
    ],
)
def test_bad_toml_value_type(toml, body, key):
    f = toml(f"[worker]\n{body}\n")
    with pytest.raises(InvalidInput, match=key):
        load_config(WorkerConfig, "worker", config_file=f, env={})


def test_bad_bool_value(toml):
    with pytest.raises(InvalidInput, match="summary"):
        load_config(AgentConfig, "agent", config_file=toml('[agent]\nsummary = "maybe"\n'), env={})
    with pytest.raises(InvalidInput, match="EDGESPLIT_AGENT_SUMMARY"):
        load_config(AgentConfig, "agent", env={"EDGESPLIT_AGENT_SUMMARY": "maybe"})


def test_bad_env_value():
    with pytest.raises(InvalidInput, match="EDGESPLIT_WORKER_MAX_QUEUE"):
        load_config(WorkerConfig, "worker", env={"EDGESPLIT_WORKER_MAX_QUEUE": "many"})


def test_unknown_env_var():
    with pytest.raises(InvalidInput, match="EDGESPLIT_WORKER_MAX_QUEEU"):
        load_config(WorkerConfig, "worker", env={"EDGESPLIT_WORKER_MAX_QUEEU": "3"})


def test_missing_or_broken_file(tmp_path, toml):
    with pytest.raises(InvalidInput, match="does not exist"):
        load_config(WorkerConfig, "worker", config_file=tmp_path / "nope.toml", env={})
    with pytest.raises(InvalidInput, match="not valid TOML"):
        load_config(WorkerConfig, "worker", config_file=toml("[worker\nx="), env={})
    with pytest.raises(InvalidInput, match="must be a table"):
        load_config(WorkerConfig, "worker", config_file=toml("worker = 3\n"), env={})


def test_cli_reports_config_errors_exit_2(toml, monkeypatch, capsys):
    f = toml("[worker]\nmax_queeu = 3\n")
    assert main(["print-config", "worker", "--config", str(f)]) == 2
    assert "max_queeu" in capsys.readouterr().err
    monkeypatch.setenv("EDGESPLIT_WORKER_NOPE", "1")
    assert main(["print-config", "worker"]) == 2
    assert "EDGESPLIT_WORKER_NOPE" in capsys.readouterr().err


def test_agent_plan_constraints_precedence_and_wire(toml, capsys):
    from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

    f = toml('[agent]\npin_blocks = ["0=device", "conv3=edge"]\nforbid_blocks = ["4=cloud"]\n'
             'max_tier_seconds = ["device=0.05", "edge=0.01"]\nmax_tier_share = ["device=0.6"]\n'
             'max_link_upload_bytes = ["device=65536"]\nmax_memory_bytes = ["edge=1000000"]\n'
             'device_memory_bytes = 2000000\nplanner_exclude_workers = ["w9"]\npin_layers = ["12=device"]\n')
    env = {"EDGESPLIT_AGENT_MAX_TIER_SHARE": "device=0.5,edge=0.4", "EDGESPLIT_AGENT_DEVICE_MEMORY_BYTES": "3000000"}
    a = load_config(AgentConfig, "agent", config_file=f, env=env, overrides={"max_tier_seconds": ("cloud=2",)})
    assert a.pin_blocks == ("0=device", "conv3=edge") and a.pin_layers == ("12=device",)  # TOML
    assert a.max_tier_share == ("device=0.5", "edge=0.4") and a.device_memory_bytes == 3_000_000  # env over TOML
    assert a.max_tier_seconds == ("cloud=2",)  # flag over TOML
    c = ppb.Constraints(**a.constraints())  # what the registration carries
    assert [(e.WhichOneof("block"), getattr(e, e.WhichOneof("block")), e.tier) for e in c.pin_blocks] == \
           [("index", 0, "device"), ("name", "conv3", "edge"), ("layer", 12, "device")]
    assert [(e.index, e.tier) for e in c.forbid_blocks] == [(4, "cloud")]
    assert dict(c.max_tier_seconds) == {"cloud": 2.0} and dict(c.max_tier_share) == {"device": 0.5, "edge": 0.4}
    assert dict(c.max_link_upload_bytes) == {"device": 65536} and dict(c.max_memory_bytes) == {"edge": 1_000_000}
    assert c.device_memory_bytes == 3_000_000 and list(c.exclude_workers) == ["w9"]
    # print-config shows them and its output loads back to the same configuration
    assert main(["print-config", "agent", "--config", str(f), "--max-tier-seconds", "edge=0.02",
                 "--max-tier-seconds", "device=0.1"]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out)["agent"]["max_tier_seconds"] == ["edge=0.02", "device=0.1"]
    back = load_config(AgentConfig, "agent", config_file=toml(out), env={})
    assert back.constraints() == load_config(AgentConfig, "agent", config_file=f, env={},
                                             overrides={"max_tier_seconds": ("edge=0.02", "device=0.1")}).constraints()


@pytest.mark.parametrize("kw, phrase", [
    ({"max_tier_share": ("edge=1.5",)}, r"max_tier_share\[edge\] is a share"),
    ({"max_tier_seconds": ("edge=-1",)}, "a cap must be > 0"),
    ({"max_tier_seconds": ("edge=fast",)}, "'fast' is not a number of seconds"),
    ({"max_memory_bytes": ("device=0",)}, r"max_memory_bytes\[device\] is 0"),
    ({"max_link_upload_bytes": ("fog=10",)}, "'fog' is not a tier"),
    ({"pin_blocks": ("conv3",)}, "pin_blocks takes BLOCK=TIER"),
    ({"pin_layers": ("first=edge",)}, "layer index >= 0"),
    ({"forbid_blocks": ("2=gpu",)}, "'gpu' is not a tier"),
    ({"device_memory_bytes": -1}, "device_memory_bytes must be >= 0"),
    ({"max_tier_share": ("edge=0.5", "edge=0.6")}, "names tier edge twice"),
])
def test_agent_plan_constraints_refused_at_start(kw, phrase):
    with pytest.raises(InvalidInput, match=phrase):
        AgentConfig(**kw)
