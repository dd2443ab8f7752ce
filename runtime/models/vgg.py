"""VGG-16 (configuration "D" of Simonyan & Zisserman, 2014), in plain torch.

Same layers and parameter shapes as ``torchvision.models.vgg16``: 13 3x3 convolutions with ReLU in
five stages separated by 2x2 max-pooling, an adaptive 7x7 average pool, and a 3-layer classifier
(4096-4096-1000) with dropout (identity in eval mode). 138.4 M parameters.

Every layer is a separate module applied in sequence, so ``torch.fx.symbolic_trace`` gives a chain
in which a cut after any node has exactly one live tensor crossing it.
"""

from __future__ import annotations

import torch
from torch import nn

# "D" configuration: channel counts, "M" = 2x2 max-pool.
CFG_D: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def _make_features(cfg: tuple[int | str, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(v, int)
            layers.append(nn.Conv2d(in_ch, v, kernel_size=3, padding=1))
            layers.append(nn.ReLU(inplace=False))
            in_ch = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG network: ``features`` -> ``avgpool`` -> flatten -> ``classifier``.

    Module names match torchvision's (``features.N``, ``classifier.N``), so a torchvision
    state dict loads into it unchanged.
    """

    def __init__(self, cfg: tuple[int | str, ...] = CFG_D, num_classes: int = 1000,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = _make_features(cfg)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation scheme.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        y: torch.Tensor = self.classifier(x)
        return y


def vgg16(num_classes: int = 1000) -> VGG:
    """VGG-16 with freshly initialised (random) weights; seed the RNG first for determinism."""
    return VGG(CFG_D, num_classes=num_classes)
