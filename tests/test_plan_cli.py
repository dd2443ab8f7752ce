"""`edgesplit plan` and `edgesplit import-peers` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.cli.main import main
from runtime.contracts import profile as profiles

PEERS = Path(__file__).resolve().parents[1] / "planner" / "peers"  # the peers' published data, bundled


def test_plan_from_peer_data_prints_the_published_result(capsys, tmp_path):
    png = tmp_path / "vgg19.png"
    rc = main(["plan", "--peers", str(PEERS / "scission_benchmarks.json"), "--model", "vgg19", "--require", "device",
               "--pin-layer", "10=edge", "--pin-layer", "16=cloud", "--no-return", "--top", "3", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    first = out.splitlines()[2].split()
    assert first[:2] == ["1", "9.0106"] and first[3] == "2.4087"
    assert "device(raspi4)=blocks 0-5; edge(vm2Core)=blocks 6-10; cloud(6700k(GPU))=blocks 11-24" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_unwritable_output_is_a_clear_error(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(["plan", "--peers", str(PEERS / "scission_benchmarks.json"), "--model", "vgg19", "--top", "1",
               "--plot", str(blocker / "plot.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "edgesplit: error:" in err and "Traceback" not in err and str(blocker) in err


def test_import_peers_then_plan_from_files(capsys, tmp_path):
    assert main(["import-peers", str(PEERS / "scissiontl_benchmarks.json"), "--out", str(tmp_path),
                 "--model", "densenet169"]) == 0
    dev, edge = tmp_path / "densenet169--tx2_gpu.json", tmp_path / "densenet169--ampere.json"
    assert profiles.load(dev).role == "device" and profiles.load(edge).n_blocks == 22
    capsys.readouterr()
    rc = main(["plan", "--profile", str(dev), "--profile", str(edge), "--network", str(tmp_path / "network-default.json"),
               "--require", "device", "--no-return", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and round(doc["configurations"][0]["seconds"], 4) == 0.1261
    assert doc["configurations"][0]["hops"][0]["transfer"] == "tl:maxpool2x2"


def test_plan_with_hand_written_profiles_and_links(capsys, tmp_path):
    def write(name, role, seconds):
        blocks = [{"index": i, "name": n, "seconds": s, "output_bytes": b}
                  for i, (n, s, b) in enumerate(zip(["a", "output"], seconds, [1000, 40], strict=False))]
        doc = {"format": "edgesplit-profile", "version": 1, "machine": name, "role": role, "model": "m",
               "input_bytes": 20000, "blocks": blocks}
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
        return str(tmp_path / f"{name}.json")

    d, e = write("pi", "device", [0.5, 0.5]), write("srv", "edge", [0.01, 0.01])
    rc = main(["plan", "--profile", d, "--profile", e, "--link", "pi,srv,10,0.08", "--json", "--top", "10"])
    doc = json.loads(capsys.readouterr().out)
    # 0.08 Mbit/s = 10,000 B/s: input 2 s, block a output 0.1 s, result 40 B 0.004 s back
    got = {c["plan"]: c["seconds"] for c in doc["configurations"]}
    assert rc == 0 and doc["configurations"][0]["plan"].startswith("device(pi)=blocks 0-0; edge(srv)=blocks 1-1")
    assert got["device(pi)=blocks 0-0; edge(srv)=blocks 1-1 via a:raw"] == pytest.approx(0.5 + 0.01 + 0.1 + 0.01 + 0.004)
    assert got["device(pi)=blocks 0-1"] == pytest.approx(1.0)
    # constraints from the command line: the device may hold nothing -> input goes raw
    rc = main(["plan", "--profile", d, "--profile", e, "--link", "pi,srv,10,0.08", "--max-tier-seconds", "device=0.1",
               "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["configurations"][0]["hops"][0]["split"] == "input"


def test_plan_errors_are_actionable(capsys, tmp_path):
    assert main(["plan"]) == 2
    assert "give profiles with --profile" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "edgesplit-profile", "version": 2}))
    assert main(["plan", "--profile", str(bad)]) == 2
    assert "profile version 2 is not supported" in capsys.readouterr().err
    bad.write_text(json.dumps({"format": "edgesplit-profile", "version": 1, "machine": "pi", "role": "device",
                               "model": "m", "input_bytes": 1, "blocks": [{"index": 0, "name": "x", "seconds": -1,
                                                                           "output_bytes": 1}]}))
    assert main(["plan", "--profile", str(bad)]) == 2
    assert "blocks/0/seconds" in capsys.readouterr().err
    assert main(["plan", "--profile", str(bad), "--pin-block", "oops"]) == 2


def test_published_schema_is_valid_and_matches_what_the_code_writes():
    import jsonschema

    from runtime.contracts.profile import Block, Profile, Transfer, schema

    jsonschema.Draft202012Validator.check_schema(schema())
    p = Profile("pi", "device", "m", (Block(0, "a", 0.1, 100, p95_seconds=0.2, first_layer=0, last_layer=3, param_bytes=8,
                                            transfers=(Transfer("int8+lz4", 30, 1e-4, 2e-4, codec="int8+lz4"),
                                                       Transfer("tl-x+raw", 10, tl_id="tl-x", fidelity=0.97))),),
                input_bytes=400, model_digest="abc", source="hand", created="2026-11-26T00:00:00+00:00",
                settings={"runs": 3})
    jsonschema.validate(json.loads(p.to_json()), schema())
    assert profiles.loads(p.to_json()) == p
