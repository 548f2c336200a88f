"""Train a reversible (converted) ResNet next to its original: an ordinary training loop for both.

Both networks start from the same weights where they share them (conversion keeps the stem, the
strided block and the head as they were), see the same batches in the same order and use the same
optimizer and schedule. A plain-text progress bar shows each step; every epoch prints, side by
side, each network's training loss and accuracy and its accuracy on held-out images.

The data: scikit-learn's bundled handwritten digits if scikit-learn is installed (the ``examples``
extra; no download), otherwise a synthetic set that a convolutional network can learn the way it
learns images: each class is a small random 6x6 motif, pasted at random places on a noise image.
(Fixed random full-image patterns, which an earlier version used, are a poor task for a network
that ends in global average pooling: they are not translation invariant, and both networks learned
them erratically.)

Why a schedule and several epochs: a converted network starts every coupling as the identity map
(the last norm of F and G starts at zero, see ``ConvertConfig.zero_init``), as torchvision's
``zero_init_residual=True`` does for ordinary blocks. That helps deep networks, but for the first
few dozen steps the network acts shallower, so a run of a hundred steps at a constant learning
rate shows it behind; with a warm-up and a few hundred steps it catches up. A run here (synthetic
data, about a minute on two CPU cores): test accuracy after epochs 1 / 3 / 4 / 10 of 0.33 / 0.86 /
0.998 / 1.000 for the original and 0.16 / 0.92 / 0.998 / 1.000 for the converted network.

Run: python examples/train_converted.py           (REVCONVERT_EXAMPLE_TINY=1 for a quick check)
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import revconvert

TINY = os.environ.get("REVCONVERT_EXAMPLE_TINY") == "1"
EPOCHS, TRAIN, TEST, BATCH = (1, 16, 16, 16) if TINY else (10, 1024, 512, 64)
SIZE = 16  # image side: small images keep the run to a few minutes on a laptop CPU
LR = 0.1
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


def digits() -> tuple[torch.Tensor, ...] | None:
    """scikit-learn's 8x8 digits as 3xSIZExSIZE images, standardised; None without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x))
    test, train = perm[:TEST], perm[TEST:TEST + TRAIN]
    x = (x - x[train].mean()) / x[train].std()
    return x[train], y[train], x[test], y[test]


def motifs(count: int, patterns: torch.Tensor, copies: int = 2, noise: float = 0.5) -> tuple[torch.Tensor, ...]:
    """Noise images with ``copies`` of their class's motif pasted at random places."""
    labels = torch.randint(0, len(patterns), (count,))
    x = noise * torch.randn(count, 3, SIZE, SIZE)
    k = patterns.shape[-1]
    for i in range(count):
        for r, c in torch.randint(0, SIZE - k + 1, (copies, 2)).tolist():
            x[i, :, r:r + k, c:c + k] += patterns[labels[i]]
    return x, labels


def progress(name: str, done: int, total: int, loss: float, width: int = 30) -> None:
    filled = width * done // total
    sys.stdout.write(f"\r  {name:9} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} loss {loss:.3f}")
    sys.stdout.flush()


data = digits()
if data is None:
    patterns = 2 * torch.randn(10, 3, 6, 6)
    data = (*motifs(TRAIN, patterns), *motifs(TEST, patterns))
    print("data: synthetic motifs (pip install scikit-learn to train on its handwritten digits instead)")
else:
    print("data: scikit-learn's handwritten digits")
x_train, y_train, x_test, y_test = data

# Convert once, then train the converted model like any other: its reversible segments store only
# their outputs and recompute the rest in backward. The original is trained alongside, for comparison.
base = small_resnet()
models = {"original": copy.deepcopy(base), "converted": revconvert.convert(base, torch.randn(1, 3, SIZE, SIZE))}
print(models["converted"].revconvert_summary, end="\n\n")
steps = (len(x_train) + BATCH - 1) // BATCH
optimizers = {name: torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
              for name, m in models.items()}
schedules = {name: torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=EPOCHS * steps)
             for name, opt in optimizers.items()}

for epoch in range(1, EPOCHS + 1):
    order = torch.randperm(len(x_train))  # the same batches, in the same order, for both networks
    results = {}
    for name, model in models.items():
        model.train()
        total_loss = correct = 0.0
        start = time.perf_counter()
        for k in range(steps):
            idx = order[k * BATCH:(k + 1) * BATCH]
            logits = model(x_train[idx])
            loss = F.cross_entropy(logits, y_train[idx])
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            schedules[name].step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
            progress(name, k + 1, steps, loss.item())
        model.eval()
        with torch.no_grad():  # evaluation is a plain forward: nothing is stored, nothing recomputed
            test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        results[name] = (f"loss {total_loss / len(x_train):.4f}  train acc {correct / len(x_train):.3f}  "
                         f"test acc {test_acc:.3f}  ({time.perf_counter() - start:.1f} s)")
    sys.stdout.write("\r" + " " * 70 + "\r")
    print(f"epoch {epoch}:")
    for name, line in results.items():
        print(f"  {name:9} {line}")
