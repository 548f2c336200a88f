"""Inner widths: why F and G's channel counts are multiples of 32 by default (``width_multiple``).

Two measurements, side by side in one run, one thread, thread CPU time:

1. ``convs``: one convolution's forward and backward (input gradient and weight gradient) at the
   shapes of resnet50's couplings where the two multiples differ (layer3 at 8x8 and layer4 at 4x4
   pixels for a 4x3x128x128 batch): at the width ``width_multiple=8`` gives (200, 400) and at the
   width 32 gives (192, 384); layer1 and layer2 are 48 and 96 wide either way. With their GFLOP/s
   (FLOPs counted by ``FlopCounterMode``). Widths are interleaved, median of ``--repeats``.
2. ``step``: resnet50 at 4x3x128x128, the original and its conversions with ``width_multiple=8`` and
   32, each under ordinary autograd and with the memory-saving backward (one training step as in
   ``speed.py``), interleaved; times and FLOPs relative to the original.

Usage:
    python benchmarks/widths.py                  # both, about 2 minutes on this CPU
    python benchmarks/widths.py --suites convs --repeats 41
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import revconvert

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from speedlib import Method, cpu_clock, flops_of, median, time_interleaved, train_step  # noqa: E402

# (pixels per side, kernel, input channels or None for the width, [width at multiple 8, at 32]):
# resnet50's coupling convolutions where the multiples differ, batch 4 at 128 px
CONVS = [
    (8, 3, None, [200, 192]), (4, 3, None, [400, 384]), (8, 1, 512, [200, 192]), (4, 1, 1024, [400, 384]),
]


def conv_rates(repeats: int) -> list[tuple[str, int, float, float]]:
    """(shape, width, ms per forward+backward, GFLOP/s) for every entry of CONVS."""
    out = []
    for side, k, cin, widths in CONVS:
        cases = []
        for w in widths:
            conv = nn.Conv2d(cin or w, w, k, padding=k // 2, bias=False)
            x = torch.randn(4, cin or w, side, side, requires_grad=True)

            def run(conv: nn.Conv2d = conv, x: torch.Tensor = x) -> None:
                y = conv(x)
                y.backward(torch.ones_like(y))
            with FlopCounterMode(display=False) as fc:
                run()
            cases.append((w, run, fc.get_total_flops()))
        times: dict[int, list[float]] = {w: [] for w, _, _ in cases}
        for _ in range(3):
            for _, run, _ in cases:
                run()
        for _ in range(repeats):
            for w, run, _ in cases:
                t0 = time.thread_time()
                run()
                times[w].append(time.thread_time() - t0)
        for w, _, flops in cases:
            t = median(times[w])
            shape = f"{k}x{k} conv, {cin or w}->{w}, {side}x{side}"
            out.append((shape, w, t * 1e3, flops / t / 1e9))
    return out


def step_ratios(repeats: int) -> list[tuple[str, float, float]]:
    """(variant, time / original's, FLOPs / original's) for resnet50 at both multiples."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    x = torch.randn(4, 3, 128, 128)
    methods = [Method("original", model, contextlib.nullcontext)]
    for multiple in (8, 32):
        converted = revconvert.convert(model, x, config=revconvert.ConvertConfig(width_multiple=multiple))
        methods.append(Method(f"multiple {multiple}, ordinary", converted, revconvert.ordinary_autograd))
        methods.append(Method(f"multiple {multiple}, memory-saving", converted, contextlib.nullcontext))
    flops = {m.name: flops_of(m, x) for m in methods}
    for m in methods:
        train_step(m, x)
    times = time_interleaved(methods, lambda m: train_step(m, x), repeats=repeats, clock=cpu_clock("thread"))
    base = median([t for t, _ in times["original"]])
    return [(m.name, median([t for t, _ in times[m.name]]) / base, flops[m.name] / flops["original"])
            for m in methods]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suites", nargs="+", choices=("convs", "step"), default=["convs", "step"])
    p.add_argument("--repeats", type=int, default=21, help="interleaved measurements per case")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# inner widths (CPU, 1 thread, torch {torch.__version__}, median of {args.repeats} interleaved runs)")
    if "convs" in args.suites:
        print("\n| convolution, batch 4 | width | ms fwd+bwd | GFLOP/s |\n|---|---:|---:|---:|")
        for shape, w, ms, rate in conv_rates(args.repeats):
            print(f"| {shape} | {w} | {ms:.2f} | {rate:.1f} |")
    if "step" in args.suites:
        print("\n| resnet50, 4x3x128x128 | time / original | FLOPs / original |\n|---|---:|---:|")
        for name, t, f in step_ratios(args.repeats):
            print(f"| {name} | {t:.3f}x | {f:.3f}x |")


if __name__ == "__main__":
    main()
