"""plan_memory against checkpoint_sequential and torch.compile's activation_memory_budget, measured.

For each model (torchvision, weights=None) and one training step (forward, sum loss, backward; gradients
start as None), rows:

- ``original``: ordinary autograd;
- ``ckpt-sequential``: ``torch.utils.checkpoint.checkpoint_sequential`` with round(sqrt(n)) segments over
  the flattened ``[stem, block, block, ...]`` Sequential (as benchmarks/compare.py);
- ``compile b=B``: ``torch.compile`` with ``torch._functorch.config.activation_memory_budget = B``, through
  AOTAutograd's min-cut partitioner (the ``aot_eager`` backend's settings). Dynamo runs eagerly under an
  active TorchDispatchMode, so the compiled forward and backward graphs are captured and the memory
  tracker and FLOP counter are entered *inside* them; time is the same budget under ``inductor``
  (``--inductor B ...``, slow to compile on a CPU);
- ``plan B``: ``revconvert.plan_memory`` at a budget of B times the original's peak, converted with
  ``plan.config``; estimated peak (``plan.peak_bytes``) next to ``measure_memory``'s.

peak: what the step allocates beyond the parameters (``measure_memory``'s ``peak_bytes - param_bytes``:
the tracked peak plus buffers and the input batch). FLOPs: ``FlopCounterMode`` (the compile rows: the same
formulas counted inside the compiled graphs). time: median of ``--reps`` eager steps (compile rows: inductor).
With ``--device cuda`` the plans are estimated for CUDA and every row also gets its CUDA peak:
``torch.cuda.max_memory_allocated`` during the step less what was allocated before it, plus buffers and
the input, beyond the parameters (for the compile rows: the ``aot_eager`` partitioned step).

Usage:
    python benchmarks/plan.py                       # resnet50 and resnet152, 16x3x160x160, CPU
    python benchmarks/plan.py --models resnet50 --inductor 0.2 --json plan_bench.json
    python benchmarks/plan.py --device cuda --models resnet50 --batch 64 --size 224
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch._functorch.config as functorch_config
import torchvision
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.utils.checkpoint import checkpoint_sequential
from torch.utils.flop_counter import FlopCounterMode

import revconvert
from revconvert.memory.plan import _Planner
from revconvert.memory.tracker import AllocationTracker, storage_bytes
from revconvert._ops import FlopCount


@dataclass
class Row:
    model: str
    method: str
    est_peak: int | None
    peak: int
    flops: int
    time_s: float | None
    peak_ratio: float = 1.0
    flops_ratio: float = 1.0
    note: str = ""
    cuda_peak: int | None = None  # --device cuda: max_memory_allocated's peak beyond the parameters


class Sequential(nn.Module):
    """The ResNet run with checkpoint_sequential over [stem, blocks...], then the head."""

    def __init__(self, model: torchvision.models.ResNet) -> None:
        super().__init__()
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        self.body = nn.Sequential(stem, *blocks)
        self.head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
        self.segments = max(1, round(math.sqrt(len(self.body))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint_sequential(self.body, self.segments, x, use_reentrant=False))


def _step(model: nn.Module, x: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    model(x).sum().backward()


def _cuda_peak(fn, model: nn.Module, x: torch.Tensor) -> int | None:  # noqa: ANN001
    """What ``fn()`` (one step, gradients None at its start) allocates on CUDA beyond the parameters:
    ``max_memory_allocated`` during it, less what was allocated before it, plus buffers and the input
    (``measure_memory``'s convention). None on CPU."""
    if not x.is_cuda:
        return None
    for p in model.parameters():
        p.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base + _resident(model, x)


def _resident(model: nn.Module, x: torch.Tensor) -> int:
    return storage_bytes([*model.buffers(), x])


def _eager_peak_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    tracker = AllocationTracker()
    with tracker:
        _step(model, x)
    tracker.stop()
    with FlopCounterMode(display=False) as counter:
        _step(model, x)
    return tracker.peak + _resident(model, x), counter.get_total_flops()


def _time(fn, reps: int) -> float:  # noqa: ANN001
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class _Inside:
    """Modes entered inside the compiled forward and backward graphs (outside, Dynamo runs eagerly)."""

    def __init__(self) -> None:
        self.modes: list = []

    def compiler(self, gm, _inputs):  # noqa: ANN001
        def run(args):  # noqa: ANN001
            with contextlib.ExitStack() as stack:
                for mode in self.modes:
                    stack.enter_context(mode)
                return gm(*args)
        run._boxed_call = True
        return run


def _compile_rows(name: str, model: nn.Module, x: torch.Tensor, budgets: list[float], reps: int,
                  inductor: list[float]) -> list[Row]:
    rows = []
    for budget in budgets:
        torch._dynamo.reset()
        inside = _Inside()
        backend = aot_autograd(fw_compiler=inside.compiler, bw_compiler=inside.compiler,
                               partition_fn=min_cut_rematerialization_partition,
                               keep_inference_input_mutations=True)
        with functorch_config.patch(activation_memory_budget=budget):
            compiled = torch.compile(model, backend=backend)
            _step(compiled, x)  # compile
            tracker, flops = AllocationTracker(), FlopCount()
            inside.modes = [tracker]
            _step(compiled, x)
            tracker.stop()
            inside.modes = [flops]
            _step(compiled, x)
            inside.modes = []
            cuda_peak = _cuda_peak(lambda: _step(compiled, x), model, x)
            t = None
            if budget in inductor:
                torch._dynamo.reset()
                fast = torch.compile(model, backend="inductor")
                t = _time(lambda: _step(fast, x), reps)
        rows.append(Row(name, f"compile b={budget}", None, tracker.peak + _resident(model, x), flops.total, t,
                        note="time: inductor" if budget in inductor else "time: not run (--inductor B)",
                        cuda_peak=cuda_peak))
        torch._dynamo.reset()
        gc.collect()
    return rows


def bench(name: str, args: argparse.Namespace) -> list[Row]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = getattr(torchvision.models, name)(weights=None).to(device).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    rows = []
    measured = revconvert.measure_memory(model, x)
    _, flops = _eager_peak_flops(model, x)
    rows.append(Row(name, "original", None, measured.peak_bytes - measured.param_bytes, flops,
                    _time(lambda: _step(model, x), args.reps), cuda_peak=_beyond_params(measured)))
    _log(rows)
    seq = Sequential(model)
    peak, flops = _eager_peak_flops(seq, x)
    rows.append(Row(name, "ckpt-sequential", None, peak, flops, _time(lambda: _step(seq, x), args.reps),
                    cuda_peak=_cuda_peak(lambda: _step(seq, x), seq, x)))
    _log(rows)

    t0 = time.perf_counter()
    planner = _Planner(model, (3, args.size, args.size), torch.float32, None, device, "spatial-convs", {})
    cal = planner.calibrate(args.batch)
    print(f"# {name}: calibration {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for fraction in args.budgets:
        t0 = time.perf_counter()
        plan = planner.plan(int(fraction * cal.original_peak), args.batch, None, cal)
        print(f"# {name}: plan {fraction} in {time.perf_counter() - t0:.0f} s\n{plan}", file=sys.stderr)
        converted = revconvert.convert(model, x, config=plan.config).to(device).train()
        m = revconvert.measure_memory(converted, x)
        with FlopCounterMode(display=False) as counter:
            _step(converted, x)
        rows.append(Row(name, f"plan {fraction}", plan.peak_bytes, m.peak_bytes - m.param_bytes,
                        counter.get_total_flops(), _time(lambda: _step(converted, x), args.reps),
                        note=("fits" if plan.fits else "does not fit") +
                             f"; flops_ratio {plan.flops_ratio:.4f}; " +
                             ", ".join(f"{p.name}: {p.decision}" for p in plan.parts if p.decision != "stored"),
                        cuda_peak=_beyond_params(m)))
        del converted
        gc.collect()
        _log(rows)
    # after the plans: the compiler's rows compile the whole model, the slowest part on a GPU host
    for row in _compile_rows(name, model, x, args.compile_budgets, args.reps, args.inductor):
        rows.append(row)
        _log(rows)
    return rows


def _log(rows: list[Row]) -> None:
    """The last row's ratios to the first (the original), and the row itself on stderr as soon as it
    is measured, so that a run cut short keeps what it measured."""
    base, r = rows[0], rows[-1]
    r.peak_ratio, r.flops_ratio = r.peak / base.peak, r.flops / base.flops
    print(f"# row: {r.model} {r.method}: est {_mib(r.est_peak)} MiB, peak {_mib(r.peak)} MiB "
          f"({r.peak_ratio:.3f}x), cuda peak {_mib(r.cuda_peak)} MiB "
          f"({'' if r.cuda_peak is None or base.cuda_peak is None else f'{r.cuda_peak / base.cuda_peak:.3f}x'}), "
          f"FLOPs {r.flops_ratio:.4f}x, {r.note}", file=sys.stderr, flush=True)


def _beyond_params(m: revconvert.MemoryBreakdown) -> int | None:
    return None if m.cuda_peak_bytes is None else m.cuda_peak_bytes - m.param_bytes


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def markdown(rows: list[Row]) -> str:
    cuda = any(r.cuda_peak is not None for r in rows)
    extra = " CUDA peak MiB | CUDA peak ratio |" if cuda else ""
    out = [f"| model | method | est. peak MiB | peak MiB | peak ratio |{extra} FLOPs ratio | time s | note |",
           "|---|---|---:|---:|---:|" + ("---:|---:|" if cuda else "") + "---:|---:|---|"]
    base = {r.model: r.cuda_peak for r in rows if r.method == "original"}
    for r in rows:
        cells = ""
        if cuda:
            ratio = "" if r.cuda_peak is None or not base.get(r.model) else f"{r.cuda_peak / base[r.model]:.3f}"
            cells = f" {_mib(r.cuda_peak)} | {ratio} |"
        out.append(f"| {r.model} | {r.method} | {_mib(r.est_peak)} | {_mib(r.peak)} | {r.peak_ratio:.3f} |{cells} "
                   f"{r.flops_ratio:.3f} | {'' if r.time_s is None else f'{r.time_s:.2f}'} | {r.note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "resnet152"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.65, 0.5, 0.45, 0.4])
    p.add_argument("--compile-budgets", type=float, nargs="+", default=[0.5, 0.2, 0.05])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--inductor", type=float, nargs="*", default=[], metavar="B",
                   help="time the compile rows of these budgets under inductor (slow to compile on a CPU)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: then each row also gets "
                   "torch.cuda.max_memory_allocated's peak, and plans are estimated for CUDA")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but CUDA is not available here")
    rows = []
    for name in args.models:
        rows += bench(name, args)
        print(markdown([r for r in rows if r.model == name]), flush=True)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
