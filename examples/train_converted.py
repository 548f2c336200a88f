"""Train a reversible (converted) ResNet: an ordinary training loop, nothing special to do.

The data is synthetic so the example runs anywhere: each class is a fixed random 32x32 pattern,
and every image is its class pattern plus noise. A plain-text progress bar shows each step; every
epoch prints training loss and accuracy and the accuracy on held-out images.

Run: python examples/train_converted.py           (REVCONVERT_EXAMPLE_TINY=1 for a quick check)
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import revconvert

TINY = os.environ.get("REVCONVERT_EXAMPLE_TINY") == "1"
EPOCHS, TRAIN, TEST, BATCH = (1, 16, 16, 16) if TINY else (3, 2048, 512, 64)
torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


def small_resnet(n: int = 2, widths: tuple[int, ...] = (16, 32), num_classes: int = 10) -> nn.Sequential:
    """A CIFAR-style ResNet: n blocks per stage; each later stage starts with a strided block."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(n):
            layers.append(Block(cin, w, 2 if i and not j else 1))
            cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def synthetic(count: int, patterns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, len(patterns), (count,))
    return patterns[labels] + 1.5 * torch.randn(count, 3, 32, 32), labels


def progress(done: int, total: int, loss: float, width: int = 30) -> None:
    filled = width * done // total
    sys.stdout.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} loss {loss:.3f}")
    sys.stdout.flush()


patterns = torch.randn(10, 3, 32, 32)
x_train, y_train = synthetic(TRAIN, patterns)
x_test, y_test = synthetic(TEST, patterns)

# Convert once, then train the converted model like any other: its reversible segments store only
# their outputs and recompute the rest in backward.
model = revconvert.convert(small_resnet(), torch.randn(1, 3, 32, 32))
print(model.revconvert_summary, end="\n\n")
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

for epoch in range(1, EPOCHS + 1):
    model.train()
    order = torch.randperm(TRAIN)
    steps = (TRAIN + BATCH - 1) // BATCH
    total_loss = correct = 0.0
    start = time.perf_counter()
    for k in range(steps):
        idx = order[k * BATCH:(k + 1) * BATCH]
        logits = model(x_train[idx])
        loss = F.cross_entropy(logits, y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y_train[idx]).sum().item()
        progress(k + 1, steps, loss.item())
    model.eval()
    with torch.no_grad():  # evaluation is a plain forward: nothing is stored, nothing recomputed
        test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"\nepoch {epoch}: loss {total_loss / TRAIN:.4f}  train acc {correct / TRAIN:.3f}  "
          f"test acc {test_acc:.3f}  ({time.perf_counter() - start:.1f} s)")
