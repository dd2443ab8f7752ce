"""``edgesplit profile``: segments compose to the full model; the profile holds what was really measured."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch
from conftest import REPO, TINY_NET

from runtime.agent.sources import open_source
from runtime.cli.profile import add_parser
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import load, loads
from runtime.measure.profiler import profile_model
from runtime.models import build_model, get_spec
from runtime.models.loader import load_model
from runtime.models.slicing import SlicedModel
from runtime.tools.tl.train import train_tl
from runtime.transfer.artifact import save_tl
from runtime.wire.codec import get_codec

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

TINY = f"{REPO / TINY_NET.split(':')[0]}:build"  # absolute: independent of the cwd
INPUTS = 3  # odd, so the median byte count is one of the measured sizes


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY)


@pytest.fixture(scope="module")
def tiny_profile(tiny):
    return profile_model(tiny, "device", runs=2, warmup=1, progress=False, inputs=INPUTS)


def _chain(sm: SlicedModel, cuts: list[int], x: torch.Tensor) -> torch.Tensor:
    for a, b in itertools.pairwise(cuts):
        x = sm.segment(a, b)(x)
    return x


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "densenet169"])
def test_segments_compose_to_the_full_model(name):
    model = build_model(get_spec(name))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    sm = SlicedModel(model, x, name)
    last = len(sm.split_points) - 1
    with torch.inference_mode():
        ref = sm.graph_module(x)
        for a, b in ((1, 2), (last // 3, 2 * last // 3), (last // 2, last - 1)):
            assert torch.equal(_chain(sm, [0, a, b, last], x), ref), (name, a, b)
        assert torch.equal(_chain(sm, list(range(last + 1)), x), ref), "every block in turn"
        assert torch.equal(sm.segment(0, last // 2)(x), sm.head(last // 2)(x))


def test_every_block_chained_is_the_full_model(tiny):
    x = next(open_source(tiny.spec, "samples", 1)).tensor
    last = len(tiny.sliced.split_points) - 1
    with torch.inference_mode():
        assert torch.equal(_chain(tiny.sliced, list(range(last + 1)), x), tiny.full(x))
    assert tiny.segment(1, 3) is tiny.segment("stem", 3)  # cached by split name
    for a, b in ((2, 2), (3, 1)):
        with pytest.raises(InvalidInput, match="earlier split point"):
            tiny.segment(a, b)


def test_profile_document(tiny, tiny_profile):
    p = tiny_profile
    assert loads(p.to_json()) == p
    points = tiny.sliced.split_points
    assert p.n_blocks == len(points) - 1
    assert [b.name for b in p.blocks] == [sp.name for sp in points[1:]] and p.blocks[-1].name == "output"
    assert [b.output_bytes for b in p.blocks] == [sp.fp32_bytes for sp in points[1:]]
    assert p.input_bytes == 4 * 3 * 64 * 64 and p.model == tiny.name and p.model_digest == tiny.digest
    assert p.settings["runs"] == 2 and p.settings["warmup"] == 1 and p.settings["inputs"] == INPUTS
    assert sum(b.param_bytes for b in p.blocks) == sum(t.numel() * 4 for t in tiny.full.state_dict().values())
    for b in p.blocks:
        assert [t.name for t in b.transfers] == ["raw", "fp16+lz4", "int8+lz4"]
        assert 0 <= b.first_layer <= b.last_layer
        times = [b.seconds, b.p95_seconds, *(t.encode_seconds for t in b.transfers),
                 *(t.decode_seconds for t in b.transfers)]
        assert all(math.isfinite(v) and v >= 0 for v in times), b
        assert b.p95_seconds >= b.seconds


def test_codec_bytes_are_the_bytes_sent(tiny, tiny_profile):
    xs = [f.tensor for f in open_source(tiny.spec, "samples", INPUTS)]
    codec = get_codec("int8+lz4")
    with torch.inference_mode():
        for k in (0, 3, len(tiny.sliced.split_points) - 1):
            msgs = [codec.encode(tiny.head(k)(x)) for x in xs]
            sizes = sorted(m.ByteSize() for m in msgs)  # the serialized Tensor message, as sent
            sent = {t.name: t.bytes for t in tiny_profile.transfers_after(k)}
            assert sent["int8+lz4"] == sizes[INPUTS // 2], k
            # int8's per-channel scale and zero point travel outside the buffer: 8 bytes a channel
            assert sent["int8+lz4"] >= len(msgs[0].buffer) + 8 * len(msgs[0].scale), k
    raw = tiny_profile.transfers_after(2)[0]
    assert raw.name == "raw" and 0 < raw.bytes - tiny_profile.blocks[1].output_bytes < 64  # buffer + header


def test_tl_transfer(tiny, tmp_path):
    tl, report = train_tl(tiny, "add", "bottleneck", 8, steps=2, batch_size=2, progress=False, pool_size=4,
                          holdout_images=2)
    tl_id, path = save_tl(tl, tiny, tiny.split("add"), tmp_path, fidelity=report["fidelity"])
    p = profile_model(tiny, "edge", runs=1, warmup=0, codecs=["int8+lz4"], tls=[str(path)], progress=False,
                      inputs=1)
    block = p.block("add")
    t = {t.name: t for t in block.transfers}[f"{tl_id}+int8+lz4"]
    x = next(open_source(tiny.spec, "samples", 1)).tensor
    with torch.inference_mode():
        z = tl.eval().encoder(tiny.head("add")(x))
    assert t.bytes == get_codec("int8+lz4").encode(z).ByteSize() < block.transfers[0].bytes
    assert t.tl_id == tl_id and t.codec == "int8+lz4" and t.fidelity == report["fidelity"]["top1_agreement"]
    assert t.encode_seconds > 0 and t.decode_seconds > 0
    assert sum(1 for b in p.blocks for t in b.transfers if t.tl_id) == 1
    assert loads(p.to_json()) == p


def _cli(*argv: str) -> int:
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["profile", *argv])
    return args.func(args)


def test_cli_writes_a_profile(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    common = ("--model", TINY, "--runs", "1", "--warmup", "0", "--inputs", "1", "--no-progress")
    assert _cli(*common, "--role", "edge", "--machine", "edge-box", "--out", str(out), "--codec", "raw") == 0
    p = load(out)
    assert p.machine == "edge-box" and p.role == "edge" and [t.name for t in p.blocks[0].transfers] == ["raw"]
    err = capsys.readouterr().err
    assert "output" in err and "raw" in err and str(out) in err
    assert _cli(*common, "--role", "cloud", "--out", "-") == 0
    assert loads(capsys.readouterr().out).role == "cloud"
    with pytest.raises(InvalidInput, match="unknown codec"):
        _cli(*common, "--role", "device", "--out", "-", "--codec", "zip")
    assert json.loads(out.read_text())["format"] == "edgesplit-profile"
