"""``edgesplit tl sweep`` (a tiny one) and the optional scikit-image data source."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from runtime.cli.main import main
from runtime.contracts.errors import InvalidInput
from runtime.tools.tl import data as tl_data
from runtime.tools.tl.sweep import COLUMNS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest



def test_tiny_sweep_writes_the_table(tmp_path, capsys):
    table, plot = tmp_path / "sweep.md", tmp_path / "sweep.png"
    argv = ["tl", "sweep", "--model", "resnet18", "--split", "20", "--ratio", "16", "--ratio", "32",
            "--steps", "2", "--images", "3", "--no-progress", "--out", str(tmp_path / "tls"), "--table", str(table)]
    has_plot = importlib.util.find_spec("matplotlib") is not None
    if has_plot:
        argv += ["--plot", str(plot)]
    assert main(argv) == 0
    text = table.read_text()
    lines = text.splitlines()
    assert lines[2] == "```sh" and lines[3].startswith("edgesplit tl sweep --model resnet18 --split 20 ")
    header = next(i for i, line in enumerate(lines) if line.startswith("| split |"))
    assert lines[header] == "| " + " | ".join(COLUMNS) + " |"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:]]
    assert all(len(r) == len(COLUMNS) for r in rows)
    got = [(r[1], r[2], r[3]) for r in rows]
    codecs = ["fp32 (raw)", "fp16", "int8+lz4"]
    assert got == ([("no TL", "", c) for c in codecs] + [("reference", "4", c) for c in codecs]
                   + [("bottleneck", "16", c) for c in codecs] + [("bottleneck", "32", c) for c in codecs])
    by = dict(zip(got, rows, strict=False))
    raw = float(by[("no TL", "", "fp32 (raw)")][4].replace(",", ""))
    assert raw > 4 * 512 * 7 * 7  # the whole serialized message, payload included
    assert float(by[("no TL", "", "fp32 (raw)")][6]) == 1.0  # bit-exact wire: full agreement
    assert float(by[("bottleneck", "32", "int8+lz4")][4].replace(",", "")) < raw / 32
    assert len(list((tmp_path / "tls").glob("tl-*.json"))) == 2  # the two trained bottlenecks
    if has_plot:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "12 rows" in capsys.readouterr().out


def test_sweep_rejects_bad_arguments(tmp_path):
    assert main(["tl", "sweep", "--model", "resnet18", "--split", "20", "--images", "0"]) == 2
    assert main(["tl", "sweep", "--model", "resnet18", "--split", "20", "--codec", "zip"]) == 2


def test_skimage_source_train_and_holdout_are_disjoint():
    pytest.importorskip("skimage", reason="--data skimage needs the optional 'train' extra (scikit-image)")
    train, holdout = tl_data.train_holdout("skimage")
    assert len(train) == 12 and len(holdout) == 4
    assert not {p.name for p in train} & {p.name for p in holdout}
    assert [p.key for p in holdout] == ["camera", "chelsea", "coffee", "rocket"]  # the bundled samples' originals
    assert (train, holdout) == tl_data.train_holdout("skimage")  # deterministic order
    img = holdout[0].open()  # camera.png is greyscale
    assert img.mode == "RGB" and min(img.size) >= 256
    spec = __import__("runtime.models.registry", fromlist=["get_spec"]).get_spec("resnet18")
    a = tl_data.holdout_crops(spec, holdout, 2, seed=0)
    assert a.shape == (2, 3, *spec.input_size) and torch.equal(a, tl_data.holdout_crops(spec, holdout, 2, seed=0))


def test_skimage_source_without_scikit_image(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name == "skimage" or name.startswith("skimage."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    with pytest.raises(InvalidInput, match=r"pip install 'edgesplit\[train\]'"):
        tl_data.train_holdout("skimage")


def test_default_and_folder_sources_unchanged(tmp_path):
    train, holdout = tl_data.train_holdout(None)
    assert [p.name for p in train] == ["cameraman.jpg", "cat.jpg", "coffee.jpg"]
    assert [p.name for p in holdout] == ["rocket.jpg"]
    assert tl_data.train_holdout(str(tl_data.SAMPLES_DIR)) == (train, holdout)
