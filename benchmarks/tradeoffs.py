"""Memory against compute: what each conversion option keeps for backward and what a step costs.

Deterministic counts on meta tensors (no activation memory is allocated, any batch size runs here):
bytes autograd saves for backward during the forward (once per storage, parameters and buffers
excluded; ``revconvert.memory.tracker.SavedTensorCounter``) and FLOPs of one training step
(forward + backward, recomputation included; ``torch.utils.flop_counter.FlopCounterMode``), for

- the original model, and with ``checkpoint_sequential`` (round(sqrt(n)) segments over
  ``[stem, blocks...]``, as in ``compare.py``);
- ``revconvert.convert`` with: the defaults; ``keep="spatial-convs"``; ``checkpoint_stored=True``;
  ``checkpoint_stored=True`` with a ``recompute_budget`` equal to checkpoint_sequential's extra
  FLOPs (revconvert at checkpoint_sequential's compute); and ``recompute_budget=0.2``.

Usage:
    python benchmarks/tradeoffs.py                       # resnet152, 2x3x224x224
    python benchmarks/tradeoffs.py --model resnet50 --batch-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torchvision

import revconvert
from revconvert import ConvertConfig

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compare import Checkpointed, Method  # noqa: E402 - the same baseline and instruments
from compare import measure as compare_measure  # noqa: E402


def measure(model: torch.nn.Module, x: torch.Tensor, *, ordinary: bool = False) -> tuple[int, int]:
    """(saved bytes, FLOPs) of one training step of ``model`` on ``x``: compare.py's instruments."""
    context = revconvert.ordinary_autograd if ordinary else contextlib.nullcontext
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    saved, _, flops = compare_measure(Method("", model, context), x, target, "none")
    return saved, flops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet152")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    with torch.device("meta"):
        torch.manual_seed(0)
        original = getattr(torchvision.models, args.model)(weights=None).train()
        x = torch.empty(*shape)

    rows: list[tuple[str, int, int]] = []
    base = measure(original, x)
    rows.append(("original", *base))
    ckpt = measure(Checkpointed(original, per_block=False), x)
    rows.append(("checkpoint_sequential", *ckpt))
    default = revconvert.convert(original, shape)
    ordinary_flops = measure(default, x, ordinary=True)[1]
    budget = ckpt[1] / ordinary_flops - 1
    configs = [
        ("convert(model)", ConvertConfig()),
        ('keep="spatial-convs"', ConvertConfig(keep="spatial-convs")),
        ("checkpoint_stored=True", ConvertConfig(checkpoint_stored=True)),
        (f"checkpoint_stored=True, recompute_budget={budget:.3f} (= checkpoint_sequential's)",
         ConvertConfig(checkpoint_stored=True, recompute_budget=budget)),
        ("recompute_budget=0.2", ConvertConfig(recompute_budget=0.2)),
    ]
    for label, config in configs:
        t0 = time.perf_counter()
        model = default if config == ConvertConfig() else revconvert.convert(original, shape, config=config)
        rows.append((label, *measure(model, x)))
        print(f"{label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    print(f"# {args.model}, one training step at {'x'.join(map(str, shape))} (meta tensors, float32, "
          f"torch {torch.__version__})\n")
    print("| method | saved for backward | vs original | vs checkpoint_sequential | GFLOPs/step "
          "| vs original | vs checkpoint_sequential |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, saved, flops in rows:
        print(f"| {label} | {saved / 2**20:.1f} MiB | {saved / base[0]:.3f}x | {saved / ckpt[0]:.3f}x "
              f"| {flops / 1e9:.1f} | {flops / base[1]:.3f}x | {flops / ckpt[1]:.3f}x |")


if __name__ == "__main__":
    main()
