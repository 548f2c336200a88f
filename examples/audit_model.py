"""Audit a hand-written residual network: which blocks can become reversible, and why not the others.

Run: python examples/audit_model.py               (REVCONVERT_EXAMPLE_TINY=1 for a quick check)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

import revconvert

TINY = os.environ.get("REVCONVERT_EXAMPLE_TINY") == "1"


class Block(nn.Module):
    """A basic residual block; a projection shortcut when it changes width or resolution."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()  # identity: the audit finds it without relying on class names
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Two stages: the second opens with a strided projection block, which cannot be inverted."""

    def __init__(self, width: int = 16, depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(*[Block(width, width) for _ in range(depth)])
        self.stage2 = nn.Sequential(Block(width, 2 * width, stride=2),
                                    *[Block(2 * width, 2 * width) for _ in range(depth - 1)])
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


model = SmallResNet(depth=2 if TINY else 3)

# The example input fixes the shapes the audit reports; no real activation memory is used.
report = revconvert.audit(model, torch.randn(1, 3, 32, 32))
print(report)
