"""Small hand-written residual networks in different coding styles, for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalBlock(nn.Module):
    """Post-activation block written with F.relu and torch.add."""

    def __init__(self, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(torch.add(out, x))


class FunctionalResNet(nn.Module):
    def __init__(self, c: int = 16, n: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.blocks = nn.ModuleList(FunctionalBlock(c) for _ in range(n))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ShortcutBlock(nn.Module):
    """CIFAR-style block: `out += self.shortcut(x)`; the identity shortcut is an empty Sequential."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class CifarResNet(nn.Module):
    """ResNet-6n+2 for 32x32 inputs (n=3: ResNet-20)."""

    def __init__(self, n: int = 3, widths=(16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(ShortcutBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class PreActBlock(nn.Module):
    """Pre-activation block: the projection shortcut reads the block's first BN-ReLU output."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet(nn.Module):
    def __init__(self, n: int = 2, widths=(16, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(PreActBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class OddChannelNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 15, 3, padding=1)
        self.block = FunctionalBlock(15)

    def forward(self, x):
        return self.block(self.stem(x))


class EscapingBranchNet(nn.Module):
    """A block whose branch intermediate is also returned as a second output."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        mid = F.relu(self.conv1(x))
        return x + self.conv2(mid), mid


class UntraceableBlock(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return x + self.conv(x)
        return x


class UntraceableNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = UntraceableBlock(8)

    def forward(self, x):
        return self.body(self.stem(x))


class DropoutBlockNet(nn.Module):
    """Identity blocks with dropout, GroupNorm and a Linear head (dropout must recompute exactly)."""

    def __init__(self, c: int = 8, n: int = 2, p: float = 0.2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential() for _ in range(0)])
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(2, c), nn.ReLU(), nn.Dropout(p), nn.Conv2d(c, c, 3, padding=1))
            for _ in range(n))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x.mean((2, 3)))


class DropoutStemNet(nn.Module):
    """Dropout and batch norm in the stem (a stored part), then identity blocks."""

    def __init__(self, c: int = 8, n: int = 2, p: float = 0.3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Dropout(p))
        self.blocks = nn.Sequential(*[FunctionalBlock(c) for _ in range(n)])
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class InplaceInputNet(nn.Module):
    """Shifts its input in place before the stem (``x.sub_``), then identity blocks."""

    def __init__(self, c: int = 8, n: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[FunctionalBlock(c) for _ in range(n)])
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = x.sub_(0.5)
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


class LibraryBatchNorm(nn.BatchNorm2d):
    """A batch norm with its own forward, as libraries write them (timm's BatchNormAct2d): it counts
    batches with ``num_batches_tracked.add_(1)`` itself, so a recomputation must give it a scratch
    counter instead of hiding the counter."""

    def forward(self, x):
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum or 0.0, self.eps)


class LibraryNormNet(nn.Module):
    """Identity blocks whose norms are :class:`LibraryBatchNorm`."""

    def __init__(self, c: int = 8, n: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), LibraryBatchNorm(c), nn.ReLU(),
                          nn.Conv2d(c, c, 3, padding=1, bias=False), LibraryBatchNorm(c))
            for _ in range(n))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = F.relu(x + b(x))
        return x.mean((2, 3))


class TreeNet(nn.Module):
    """DLA's tree: the first block's output feeds the second block *and* the aggregation, so each
    block is a reversible segment of its own and the second starts where the first ends."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.tree1, self.tree2 = ShortcutBlock(c, c), ShortcutBlock(c, c)
        self.root = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        a = self.tree1(x)
        b = self.tree2(a)
        return self.head(self.root(torch.cat([b, a], 1)).mean((2, 3)))
