"""revconvert against the alternatives, measured side by side in one run.

For each torchvision ResNet (weights=None) and one training step (forward, cross-entropy, backward), five methods:

- ``original``: the model with ordinary autograd;
- ``ckpt-sequential``: ``torch.utils.checkpoint.checkpoint_sequential`` with round(sqrt(n)) segments
  over the flattened ``[stem, block, block, ...]`` Sequential (its last segment is not checkpointed,
  as torch does it);
- ``ckpt-per-block``: ``torch.utils.checkpoint.checkpoint`` around every element of that Sequential;
- ``revconvert``: ``revconvert.convert(model)`` with its memory-saving reversible backward;
- ``revconvert-ordinary``: the same converted model under ``revconvert.ordinary_autograd()``, which
  stores every activation and so isolates the cost of the recomputation;
- ``revconvert-keep``: ``ConvertConfig(keep="spatial-convs")``: every coupling keeps its 3x3 conv
  outputs, so the backward recomputes only the cheap ops (more memory, fewer FLOPs, faster);
- ``revconvert-budget``: revconvert at checkpoint_sequential's compute: ``ConvertConfig(
  checkpoint_stored=True, recompute_budget=B)`` where B is ckpt-sequential's extra FLOPs per step over
  the converted model's ordinary step, measured in this run. The stored parts (stem, projection
  blocks) are checkpointed too, and the planner lets the couplings with the cheapest bytes per FLOP
  keep their 3x3 conv outputs until the step costs no more FLOPs than checkpoint_sequential's.

Columns (each also as a ratio to ``original``):

- saved: bytes autograd keeps for backward, from ``saved_tensors_hooks`` during the forward,
  deduplicated by storage, parameters and buffers excluded. checkpoint's own saved inputs count;
  the revconvert Function's saved output counts.
- peak: the highest live-tensor bytes reached during the step above the bytes live before it
  (weights, the batch; gradients too with ``--grads zeroed``); a TorchDispatchMode tracker on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA. With the default ``--grads none`` the gradients are
  allocated during the step and are part of the peak, as in a default training loop.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward (recomputation included).
- time: median wall time of a step; methods run round-robin (interleaved) so machine noise hits all.

Usage:
    python benchmarks/compare.py --quick                 # CPU, < 10 min on 2 cores
    python benchmarks/compare.py --device cuda --json compare_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential
from torch.utils.flop_counter import FlopCounterMode

import revconvert
from revconvert.memory.tracker import AllocationTracker, SavedTensorCounter

METHODS = ("original", "ckpt-sequential", "ckpt-per-block", "revconvert", "revconvert-ordinary",
           "revconvert-keep", "revconvert-budget")


# --------------------------------------------------------------------------------------------- #
# instruments
# --------------------------------------------------------------------------------------------- #
# The library's own instruments (revconvert.memory.tracker), the ones measure_memory uses:
# AllocationTracker counts storages first seen as an op output (weights and the batch exist before
# and never count); SavedTensorCounter counts what autograd saves, once per storage, weights excluded.


# --------------------------------------------------------------------------------------------- #
# methods
# --------------------------------------------------------------------------------------------- #
def flatten_resnet(model: torchvision.models.ResNet) -> tuple[nn.Sequential, nn.Module]:
    """``[stem, every residual block]`` as one Sequential, and the head (pooling + fc)."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return nn.Sequential(stem, *blocks), head


class Checkpointed(nn.Module):
    """The original ResNet (same modules, same weights) run with torch.utils.checkpoint."""

    def __init__(self, model: torchvision.models.ResNet, *, per_block: bool) -> None:
        super().__init__()
        self.body, self.head = flatten_resnet(model)
        self.per_block = per_block
        self.segments = max(1, round(math.sqrt(len(self.body))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_block:
            for block in self.body:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = checkpoint_sequential(self.body, self.segments, x, use_reentrant=False)
        return self.head(x)


@dataclass
class Method:
    name: str
    model: nn.Module
    context: Callable[[], contextlib.AbstractContextManager]


def build_methods(name: str, x: torch.Tensor, target: torch.Tensor) -> list[Method]:
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None).to(x.device).train()
    converted = revconvert.convert(original, x.shape).to(x.device).train()
    none = contextlib.nullcontext
    methods = [
        Method("original", original, none),
        Method("ckpt-sequential", Checkpointed(original, per_block=False), none),
        Method("ckpt-per-block", Checkpointed(original, per_block=True), none),
        Method("revconvert", converted, none),
        Method("revconvert-ordinary", converted, revconvert.ordinary_autograd),
    ]
    torch.manual_seed(0)
    keep = revconvert.convert(original, x.shape, config=revconvert.ConvertConfig(keep="spatial-convs"))
    methods.append(Method("revconvert-keep", keep.to(x.device).train(), none))
    # revconvert given checkpoint_sequential's compute: its extra FLOPs over the converted model's
    # ordinary step become the recompute budget (the planner's FLOP counts are exact, see tests).
    ckpt_flops = measure(methods[1], x, target, "none")[2]
    ordinary_flops = measure(methods[4], x, target, "none")[2]
    config = revconvert.ConvertConfig(checkpoint_stored=True, recompute_budget=ckpt_flops / ordinary_flops - 1)
    torch.manual_seed(0)
    budget = revconvert.convert(original, x.shape, config=config).to(x.device).train()
    methods.append(Method("revconvert-budget", budget, none))
    return methods


def step(method: Method, x: torch.Tensor, target: torch.Tensor, *, grads: str,
         saved: SavedTensorCounter | None = None) -> None:
    """One training step without the optimizer's update.

    ``grads="none"`` starts from ``.grad = None`` (what ``zero_grad()`` does by default), so the
    gradients are allocated during the step and count in its peak; ``"zeroed"`` keeps them resident
    and zeroes them in place (``zero_grad(set_to_none=False)``, gradient accumulation), so the peak
    is activations plus transients only.
    """
    for p in method.model.parameters():
        if grads == "none" or p.grad is None:
            p.grad = None if grads == "none" else torch.zeros_like(p)
        else:
            p.grad.zero_()
    if saved is not None:
        saved.segment = "step"
    with method.context(), (saved or contextlib.nullcontext()):
        loss = F.cross_entropy(method.model(x), target)
        if saved is not None:
            saved.segment = None  # the backward's recomputation saves tensors only transiently
        loss.backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Row:
    model: str
    method: str
    saved_bytes: int
    peak_bytes: int
    flops: int
    time_s: float
    times_s: list[float]
    saved_ratio: float = 1.0
    peak_ratio: float = 1.0
    flops_ratio: float = 1.0
    time_ratio: float = 1.0


def measure(method: Method, x: torch.Tensor, target: torch.Tensor, grads: str) -> tuple[int, int, int]:
    """(saved bytes, peak bytes, FLOPs) of one instrumented step."""
    device = x.device
    resident = [*method.model.parameters(), *method.model.buffers()]
    saved = SavedTensorCounter(exclude=resident)
    flops = FlopCounterMode(display=False)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with flops:
            step(method, x, target, grads=grads, saved=saved)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        tracker = AllocationTracker()
        with flops, tracker:
            step(method, x, target, grads=grads, saved=saved)
        peak = tracker.peak
        tracker.stop()
    total = saved.total
    saved.close()
    return total, peak, flops.get_total_flops()


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device)
    target = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
    methods = build_methods(name, x, target)

    stats = {}
    for m in methods:
        for _ in range(args.warmup):  # allocator and lazy initialisation outside every measurement
            step(m, x, target, grads=args.grads)
        stats[m.name] = measure(m, x, target, args.grads)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:  # round-robin: load changes on a shared machine hit every method alike
            _sync(device)
            t0 = time.perf_counter()
            step(m, x, target, grads=args.grads)
            _sync(device)
            times[m.name].append(time.perf_counter() - t0)
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    rows = [Row(name, m.name, *stats[m.name], statistics.median(times[m.name]), times[m.name])
            for m in methods]
    base = rows[0]
    for r in rows:
        r.saved_ratio = r.saved_bytes / base.saved_bytes
        r.peak_ratio = r.peak_bytes / base.peak_bytes
        r.flops_ratio = r.flops / base.flops
        r.time_ratio = r.time_s / base.time_s
    return rows


# --------------------------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------------------------- #
def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def markdown(rows: list[Row], peak_label: str) -> str:
    head = ["model", "method", "saved for backward", "", f"peak ({peak_label})", "",
            "GFLOPs/step", "", "time/step", ""]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * 8) + "|"]
    for r in rows:
        cells = [r.model, r.method, _mib(r.saved_bytes), f"{r.saved_ratio:.2f}x", _mib(r.peak_bytes),
                 f"{r.peak_ratio:.2f}x", f"{r.flops / 1e9:.2f}", f"{r.flops_ratio:.2f}x",
                 f"{r.time_s * 1e3:.0f} ms", f"{r.time_ratio:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    """The two targets of the design, reported (not asserted)."""
    out = []
    by = {(r.model, r.method): r for r in rows}
    for model in dict.fromkeys(r.model for r in rows):
        seq, ordn = by[model, "ckpt-sequential"], by[model, "revconvert-ordinary"]
        for method in ("revconvert", "revconvert-budget"):
            rev = by[model, method]
            mem, fl = rev.saved_bytes / seq.saved_bytes, rev.flops / seq.flops
            ok = "met" if mem <= 0.5 and fl <= 1.0 else "missed"
            out.append(f"- {model}: {method} saves {mem:.2f}x the bytes of ckpt-sequential at {fl:.3f}x its "
                       f"FLOPs and peaks at {rev.peak_bytes / seq.peak_bytes:.2f}x its peak "
                       f"(target <= 0.5x bytes at <= 1.0x FLOPs: {ok})")
        rec = by[model, "revconvert"].flops / ordn.flops
        ok2 = "met" if rec <= 1.34 else "missed"
        out.append(f"- {model}: revconvert's recomputation costs {rec:.2f}x the FLOPs of ordinary autograd on "
                   f"the converted model (target <= 1.34x: {ok2})")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "resnet152"])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method before measuring")
    parser.add_argument("--grads", choices=("none", "zeroed"), default="none",
                        help="gradients at the start of a step: None (default zero_grad) or zeroed in place")
    parser.add_argument("--quick", action="store_true", help="small input, few repeats (< 10 min on 2 CPU cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    # (batch, image size, timed repeats, warm-up steps); the instrumented step also warms up
    defaults = (2, 64, 3, 0) if args.quick else ((4, 128, 7, 1) if device.type == "cpu" else (32, 224, 15, 2))
    args.batch_size = args.batch_size or defaults[0]
    args.image_size = args.image_size or defaults[1]
    args.repeats = args.repeats or defaults[2]
    args.warmup = defaults[3] if args.warmup is None else args.warmup

    peak_label = "CUDA max allocated" if device.type == "cuda" else "CPU live tensors"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    setup = (f"batch {args.batch_size}x3x{args.image_size}x{args.image_size}, float32, {where}, "
             f"torch {torch.__version__}, gradients {args.grads} at step start, "
             f"median of {args.repeats} interleaved steps")
    print(f"# revconvert vs checkpointing: one training step ({setup})\n", flush=True)

    rows: list[Row] = []
    for name in args.models:
        t0 = time.perf_counter()
        rows += bench_model(name, args, device)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(markdown(rows, peak_label))
    print()
    print("\n".join(targets(rows)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"setup": setup, "device": str(device), "batch_size": args.batch_size,
                       "image_size": args.image_size, "repeats": args.repeats, "grads": args.grads,
                       "rows": [asdict(r) for r in rows]}, fh, indent=2)


if __name__ == "__main__":
    main()
