"""Benchmark the reversible runtime against ordinary autograd, per-coupling checkpointing and MemCNN.

Same couplings for every method (8 couplings, 64 channels, 32x32, batch 8; F and G are
conv-BN-ReLU-conv-BN on 32 channels). For one training step (forward, mean loss, backward) it reports
the bytes autograd saves for backward, the peak live memory of the step's tensors, the FLOPs counted
by ``torch.utils.flop_counter.FlopCounterMode`` and the median wall time of interleaved runs, each also
as a ratio to ordinary autograd.

    python benchmarks/bench_runtime.py [--quick] [--json PATH] [--repeats N] [--threads N]

MemCNN (``pip install memcnn``) is a benchmark-only comparison; it is skipped when not installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from revconvert.memory.tracker import AllocationTracker, SavedTensorCounter
from revconvert.runtime import ReversibleCoupling, ReversibleSegment


def residual(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
    )


class CheckpointedCouplings(nn.Module):
    """torch.utils.checkpoint around each coupling (non-reentrant)."""

    def __init__(self, couplings: nn.ModuleList):
        super().__init__()
        self.couplings = couplings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, 1)
        for coupling in self.couplings:
            x1, x2 = checkpoint(coupling, x1, x2, use_reentrant=False)
        return torch.cat((x1, x2), 1)


def memcnn_model(couplings: nn.ModuleList) -> nn.Module | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import memcnn
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return nn.Sequential(*[
        memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm=c.F, Gm=c.G, split_dim=1), keep_input=False,
                                       keep_input_inverse=False, preserve_rng_state=True)
        for c in couplings
    ])


def make_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        model(inp * 1.0).mean().backward()  # "* 1.0": a non-leaf input, as inside a network

    return step


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves in the forward, once per storage, parameters and buffers excluded."""
    with SavedTensorCounter(exclude=[*model.parameters(), *model.buffers()]) as counter:
        counter.segment = "forward"
        model(x.clone().requires_grad_(True) * 1.0)
    total = counter.total
    counter.close()
    return total


def measure(methods: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    steps = {name: make_step(model, x) for name, model in methods.items()}
    results: dict[str, dict[str, float]] = {name: {} for name in methods}
    for name, model in methods.items():
        steps[name]()  # warm-up (allocator, lazy init)
        results[name]["saved_bytes"] = saved_bytes(model, x)
        tracker = AllocationTracker()  # CPU has no allocator statistics: count live storages
        with tracker:
            steps[name]()
        results[name]["peak_bytes"] = tracker.peak
        tracker.stop()
        with FlopCounterMode(display=False) as counter:
            steps[name]()
        results[name]["flops"] = counter.get_total_flops()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit every method alike
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    for name in methods:
        results[name]["wall_s"] = statistics.median(times[name])
    return results


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def table(results: dict[str, dict[str, float]]) -> str:
    base = results["ordinary autograd"]
    lines = [
        "| method | saved for backward | ratio | peak live memory | ratio | GFLOP/step | ratio | wall ms/step | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {mib(r['saved_bytes'])} | {r['saved_bytes'] / base['saved_bytes']:.3f} "
            f"| {mib(r['peak_bytes'])} | {r['peak_bytes'] / base['peak_bytes']:.3f} "
            f"| {r['flops'] / 1e9:.3f} | {r['flops'] / base['flops']:.3f} "
            f"| {r['wall_s'] * 1e3:.1f} | {r['wall_s'] / base['wall_s']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats (5 instead of 21)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats per method")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--couplings", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 21)

    torch.manual_seed(0)
    half = args.channels // 2
    couplings = nn.ModuleList(ReversibleCoupling(residual(half), residual(half)) for _ in range(args.couplings))
    ordinary = ReversibleSegment(copy.deepcopy(couplings))
    ordinary.use_reversible_backward = False
    methods: dict[str, nn.Module] = {
        "ordinary autograd": ordinary,
        "torch.utils.checkpoint per coupling": CheckpointedCouplings(copy.deepcopy(couplings)),
        "revconvert ReversibleSegment": ReversibleSegment(copy.deepcopy(couplings)),
    }
    mem = memcnn_model(copy.deepcopy(couplings))
    if mem is not None:
        methods["MemCNN InvertibleModuleWrapper"] = mem
    else:
        print("MemCNN not installed; skipped (pip install memcnn)")
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    results = measure(methods, x, repeats)
    print(
        f"{args.couplings} couplings, {args.channels} channels, {args.size}x{args.size}, batch {args.batch}, "
        f"float32, CPU, {torch.get_num_threads()} threads, median of {repeats} interleaved steps, torch {torch.__version__}"
    )
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
