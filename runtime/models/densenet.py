"""DenseNet-169 (Huang et al., 2017), in plain torch.

Growth rate 32, block configuration (6, 12, 32, 32), bottleneck width 4 x growth, 64 initial
features, compression 0.5 in the transitions. The parameters and module names match
``torchvision.models.densenet169`` (14.1 M parameters), so its state dict loads unchanged.

The one deliberate difference is how a dense block is written. torchvision keeps a Python list
of all earlier feature maps and concatenates them inside each layer, so every earlier map stays
live until the block ends and no single-tensor cut exists inside a block. Here each dense layer
is ``x = torch.cat([x, layer(x)], 1)`` (the formulation Keras uses). The arithmetic is the same
(BN is per-channel, so normalising the concatenation equals concatenating the normalised maps),
and after every dense layer exactly one tensor is live: a valid cut in the ``torch.fx`` graph.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (to bn_size*growth) - BN-ReLU-3x3 conv (to growth); returns new features only."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.dropout = nn.Dropout(p=drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        y: torch.Tensor = self.dropout(out)
        return y


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each appends ``growth_rate`` channels to the running tensor.

    A ModuleDict (like torchvision's) so parameter names are ``denseblockK.denselayerN.*``.
    """

    def __init__(self, num_layers: int, in_ch: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)
        return x


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (halving channels) - 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=False)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2,
                                                    padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=False))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        ch = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}",
                                     DenseBlock(num_layers, ch, bn_size, growth_rate, drop_rate))
            ch += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(ch, ch // 2))
                ch //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(ch))
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation scheme.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.relu(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        y: torch.Tensor = self.classifier(x)
        return y


def densenet169(num_classes: int = 1000) -> DenseNet:
    """DenseNet-169 with freshly initialised (random) weights."""
    return DenseNet(32, (6, 12, 32, 32), 64, bn_size=4, num_classes=num_classes)
