"""A tiny fx-traceable CNN with a residual connection, for end-to-end tests of user models.

Used as ``tests/data/tiny_net.py:build``; weights are seeded, so every process builds the same net.
"""

import torch
from torch import nn

EDGESPLIT_INPUT_SIZE = (64, 64)
EDGESPLIT_LABELS = tuple(f"class-{i}" for i in range(10))


class TinyNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.act(self.stem(x))
        y = self.conv2(self.act(self.conv1(x)))
        x = self.act(x + y)  # residual connection
        x = self.act(self.down(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def build() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return TinyNet()
