"""Does a converted network still learn? ResNet-20 vs its revconvert conversion on real digits.

scikit-learn's bundled handwritten digits (1797 images of 8x8, shipped inside the package, no
download) are upsampled to 32x32 and repeated to 3 channels; a seeded 80/20 split gives 1437
training and 360 test images. A CIFAR-style ResNet-20 and ``revconvert.convert`` of the same
initial model are trained from the same seed, on the same batches in the same order, with the same
optimizer, then evaluated on the test set. Activation memory is the bytes autograd saves for the
backward pass of one training batch (``saved_tensors_hooks``, deduplicated by storage, weights
excluded).

Usage (needs the ``examples`` extra: ``pip install scikit-learn``):
    python benchmarks/digits_train.py                 # a few minutes on 2 CPU cores
    python benchmarks/digits_train.py --epochs 15 --seeds 0 1 2 --json digits.json
    python benchmarks/digits_train.py --paired        # also ConvertConfig(pair_blocks=True)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import revconvert
from revconvert.memory.tracker import SavedTensorCounter


# --------------------------------------------------------------------------------------------- #
# data and model
# --------------------------------------------------------------------------------------------- #
def load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 3x32x32 float images, standardised with train statistics."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        sys.exit("digits_train.py needs scikit-learn: pip install scikit-learn (the 'examples' extra)")
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 1797x1x8x8 in [0, 1]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


class BasicBlock(nn.Module):
    """He et al.'s CIFAR block; the shortcut is a 1x1 projection where width or resolution changes."""

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
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-6n+2 for 32x32 inputs; n=3 is ResNet-20 (0.27M parameters)."""

    def __init__(self, n: int = 3, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------------------------- #
# measurement and training
# --------------------------------------------------------------------------------------------- #
def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one training step (a deep copy runs it: no side effects)."""
    model = copy.deepcopy(model).train()
    with SavedTensorCounter(exclude=[*model.parameters(), *model.buffers()]) as counter:
        counter.segment = "forward"
        loss = F.cross_entropy(model(x), y)
        counter.segment = None  # the backward's recomputation saves tensors only transiently
    loss.backward()
    total = counter.total
    counter.close()
    return total


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train(model: nn.Module, data: tuple[torch.Tensor, ...], *, epochs: int, batch_size: int, lr: float,
          seed: int, label: str) -> dict[str, float]:
    """SGD with momentum and a cosine schedule; the batch order depends on ``seed`` only."""
    x_train, y_train, x_test, y_test = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        total = 0.0
        for k in range(steps_per_epoch):
            idx = perm[k * batch_size:(k + 1) * batch_size].to(x_train.device)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"  {label:10} epoch {epoch:2d}/{epochs}  loss {total / len(x_train):.4f}  "
              f"test acc {accuracy(model, x_test, y_test):.4f}", file=sys.stderr, flush=True)
    return {"train_loss": total / len(x_train), "test_acc": accuracy(model, x_test, y_test),
            "seconds": time.perf_counter() - start}


@dataclass
class Result:
    seed: int
    model: str
    params: int
    test_acc: float
    train_loss: float
    saved_bytes: int
    seconds: float


def run_seed(seed: int, args: argparse.Namespace) -> list[Result]:
    data = tuple(t.to(args.device) for t in load_digits(args.split_seed))
    x, y = data[0][:args.batch_size], data[1][:args.batch_size]
    torch.manual_seed(seed)
    original = ResNet20().to(args.device)
    # Convert the same initial weights: stored parts are copied, couplings are initialised by
    # convert() (the identity at start) from the generator state right after the original's init.
    state = torch.get_rng_state()
    converted = revconvert.convert(original, torch.zeros(1, 3, 32, 32, device=args.device))
    models = [("original", original), ("converted", converted)]
    if args.paired:  # its couplings initialised from the same generator state as the default's
        torch.set_rng_state(state)
        paired = revconvert.convert(original, torch.zeros(1, 3, 32, 32, device=args.device),
                                    config=revconvert.ConvertConfig(pair_blocks=True))
        models.append(("paired", paired))
    results = []
    for label, model in models:
        nbytes = saved_bytes(model, x, y)
        out = train(model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                    label=label)
        results.append(Result(seed, label, sum(p.numel() for p in model.parameters()), out["test_acc"],
                              out["train_loss"], nbytes, out["seconds"]))
    return results


def markdown(results: list[Result]) -> str:
    lines = ["| seed | model | params | test accuracy | final train loss | saved for backward (batch) | train time |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.seed} | {r.model} | {r.params / 1e3:.1f}k | {100 * r.test_acc:.2f}% | "
                     f"{r.train_loss:.4f} | {r.saved_bytes / 2**20:.2f} MiB | {r.seconds:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="model init and batch order")
    parser.add_argument("--split-seed", type=int, default=0, help="train/test split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paired", action="store_true",
                        help="also train the conversion with ConvertConfig(pair_blocks=True)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    results: list[Result] = []
    for seed in args.seeds:
        results += run_seed(seed, args)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{torch.get_num_threads()} CPU threads"
    print(f"# ResNet-20 on sklearn digits (32x32, 1437 train / 360 test, split seed {args.split_seed}), "
          f"{args.epochs} epochs, batch {args.batch_size}, SGD+nesterov, one-cycle lr {args.lr}, "
          f"torch {torch.__version__}, {where}\n")
    print(markdown(results))
    orig = [r.test_acc for r in results if r.model == "original"]
    conv = [r.test_acc for r in results if r.model == "converted"]
    gap = 100 * (statistics.mean(orig) - statistics.mean(conv))
    mem = statistics.mean(r.saved_bytes for r in results if r.model == "converted") / \
        statistics.mean(r.saved_bytes for r in results if r.model == "original")
    verdict = "met" if gap <= 1.0 else "missed"
    print(f"\nmean test accuracy: original {100 * statistics.mean(orig):.2f}%, converted "
          f"{100 * statistics.mean(conv):.2f}% (gap {gap:+.2f} points; target <= 1 point: {verdict}); "
          f"converted saves {mem:.2f}x the activation bytes of the original")
    paired = [r for r in results if r.model == "paired"]
    if paired:
        gap = 100 * (statistics.mean(orig) - statistics.mean(r.test_acc for r in paired))
        mem = statistics.mean(r.saved_bytes for r in paired) / \
            statistics.mean(r.saved_bytes for r in results if r.model == "original")
        print(f"paired: mean test accuracy {100 * statistics.mean(r.test_acc for r in paired):.2f}% (gap "
              f"{gap:+.2f} points; target <= 1 point: {'met' if gap <= 1.0 else 'missed'}); saves {mem:.2f}x "
              f"the activation bytes of the original")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                       "split_seed": args.split_seed, "results": [asdict(r) for r in results]}, fh, indent=2)


if __name__ == "__main__":
    main()
