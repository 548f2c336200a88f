"""Speed: does a converted training step cost what its FLOPs say? (issue 11's acceptance benchmark)

One training step = forward, ``.float().mean()`` loss, backward, ``zero_grad(set_to_none=True)``.
Variants of each model, measured side by side in one run (times are medians of interleaved steps;
op counts and FLOPs are deterministic):

- ``original``: the torchvision model;
- ``ordinary``: ``revconvert.convert(model, example)`` run under ``revconvert.ordinary_autograd()``
  (forward and backward): the converted function with every activation stored;
- ``memory-saving``: the same converted model with its reversible backward (the default);
- ``keep``: ``ConvertConfig(keep="spatial-convs")``: couplings keep their 3x3 conv outputs;
- ``paired`` / ``paired ordinary``: ``ConvertConfig(pair_blocks=True)`` (F from one block, G from
  the next: half the layers), memory-saving and under ordinary autograd.

Suites (CPU ones run with ``torch.set_num_threads(1)`` and time each step in thread CPU time):

- ``launch``: launch-bound proxy. torchvision's Bottleneck ResNet-152 graph with every channel width
  divided by 8 (stem 8, stages 8/16/32/64, expansion 4), random weights, 1x3x64x64. Kernels are
  tiny, so per-op overhead decides the step, as short kernels do on a GPU.
- ``ops``: kernel-launching aten ops per resnet152 step at 1x3x64x64, counted by a
  ``TorchDispatchMode`` over forward and backward. Views/aliases (``OpOverload.is_view``: view,
  t, expand, detach, split, ...) and ``empty*`` / ``_unsafe_view`` / ``lift_fresh`` launch nothing
  and are not counted; every other op is one kernel (or one library call). Ops that ``keep`` hands
  back instead of recomputing are not dispatched, so they do not count. Also prints which ops the
  memory-saving step adds to the ordinary one, and which revconvert code dispatches its ops; then
  the same counts under autocast for each of ``--dtypes`` other than float32 (weight casts count).
- ``compute``: compute-bound, resnet50 at 4x3x128x128, times and FLOPs
  (``torch.utils.flop_counter.FlopCounterMode``).
- ``gpu`` (default with ``--device cuda``; ``--gpu-suite`` runs its code path on CPU at tiny
  sizes): resnet152 at 32x3x224x224, float32 and bf16 autocast; rows original,
  ``checkpoint_sequential`` (``compare.Checkpointed``: round(sqrt(n)) segments over
  ``[stem, 50 blocks]`` = 7 for resnet152), memory-saving, ordinary, and ``torch.compile``d original
  and memory-saving (inductor; in bfloat16 only unless ``--compile-dtypes``: compiling is the
  suite's longest part, and a precision change compiles again). CUDA-event times, 3 warm-up steps
  (the first one compiles; its time is the "compile s" column), 10 interleaved timed steps; peak
  memory = ``max_memory_allocated`` during one step minus ``memory_allocated`` before it (gradients
  are None at the start, so they count). PyTorch's default TF32 setting for convolutions (on) and
  ``cudnn.benchmark`` (off) are kept. A variant that raises becomes a row "compile failed: <reason>"
  (or "failed: ...") and the suite goes on.

Every measured ratio is printed at the end with its target and PASS/MISS.

Usage:
    python benchmarks/speed.py                    # CPU: launch, ops, compute (5 min on 2 busy cores)
    python benchmarks/speed.py --quick            # CPU, 9 instead of 25 repeats (75 s)
    python benchmarks/speed.py --device cuda --json speed_cuda.json    # gpu + ops on the GPU (not yet timed)
    python benchmarks/speed.py --device cuda --quick  # bfloat16 only, 5 repeats
    python benchmarks/speed.py --gpu-suite        # the GPU suite's code path on CPU, tiny (smoke test)
    python benchmarks/speed.py --suites launch ops --repeats 51
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torchvision

import revconvert
from revconvert.memory.tracker import AllocationTracker
from revconvert.runtime._direct import DirectSequential
from revconvert.runtime._fused import FusedCoupling

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compare import Checkpointed  # noqa: E402 - the same checkpoint_sequential baseline
from speedlib import (  # noqa: E402
    GraphedSegments,
    GraphedStep,
    Method,
    NarrowResNet,
    Row,
    Target,
    count_launches,
    count_ops,
    cpu_clock,
    cuda_clock,
    error_line,
    flops_of,
    grad_difference,
    median,
    ratio,
    time_interleaved,
    train_step,
)
from speedlib import gpu_table, ops_breakdown, ops_table, targets_table, timed_table, where_table  # noqa: E402

SUITES = ("launch", "ops", "compute", "gpu")


# --------------------------------------------------------------------------------------------- #
# variants
# --------------------------------------------------------------------------------------------- #
def fg_options(backend: str, args: argparse.Namespace) -> dict:
    """The ``ConvertConfig(compile=...)`` options of the F/G-compiled rows."""
    return {"backend": backend} if args.fg_mode is None else {"backend": backend, "mode": args.fg_mode}


def variants(original: torch.nn.Module, x: torch.Tensor, compile_fg: dict | None = None,
             keep_small: bool = False) -> list[Method]:
    """original, converted under ordinary autograd, converted memory-saving, converted keep (with
    ``keep_small``: keeping every 3x3 convolution, however small), paired under ordinary autograd and
    memory-saving; with ``compile_fg`` (torch.compile
    options) also the original compiled with them and memory-saving with F and G compiled."""
    null = contextlib.nullcontext
    original = original.to(x.device).train()
    torch.manual_seed(0)
    converted = revconvert.convert(original, x.shape).to(x.device).train()
    torch.manual_seed(0)
    keep = keep_every(revconvert.convert(original, x.shape, config=revconvert.ConvertConfig(keep="spatial-convs")),
                      keep_small)
    torch.manual_seed(0)
    paired = revconvert.convert(original, x.shape, config=revconvert.ConvertConfig(pair_blocks=True))
    paired = paired.to(x.device).train()
    methods = [Method("original", original, null),
               Method("ordinary", converted, revconvert.ordinary_autograd),
               Method("memory-saving", converted, null),
               Method("keep", keep.to(x.device).train(), null),
               Method("paired ordinary", paired, revconvert.ordinary_autograd),
               Method("paired", paired, null)]
    if compile_fg:
        torch.manual_seed(0)
        fg = revconvert.convert(original, x.shape, config=revconvert.ConvertConfig(compile=compile_fg))
        methods += [Method("compiled original", torch.compile(copy.deepcopy(original), **compile_fg), null),
                    Method("memory-saving F/G compiled", fg.to(x.device).train(), null)]
    return methods


def keep_every(model: torch.nn.Module, keep_small: bool) -> torch.nn.Module:
    """``model`` with, if ``keep_small``, every coupling keeping calls below ``MIN_KEPT_FLOPS`` too."""
    for m in model.modules():
        if isinstance(m, revconvert.ReversibleCoupling):
            m.keep_small = keep_small
    return model


def couplings_of(model: torch.nn.Module) -> int:
    return sum(isinstance(m, revconvert.ReversibleCoupling) for m in model.modules())


# --------------------------------------------------------------------------------------------- #
# CPU suites
# --------------------------------------------------------------------------------------------- #
def timed_suite(suite: str, original: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace) -> list[Row]:
    """FLOPs and interleaved median step times of the four variants."""
    methods = variants(original, x, fg_options(args.fg_backend, args) if args.compile_fg else None, args.keep_small)
    methods += ab_variants(methods, args)
    rows = [Row(suite, m.name) for m in methods]
    for m, row in zip(methods, rows):
        for _ in range(args.warmup):
            train_step(m, x)
        row.flops = flops_of(m, x)
    times = time_interleaved(methods, lambda m: train_step(m, x), repeats=args.repeats, clock=args.clock_fn)
    for row in rows:
        row.times_s = [t for t, _ in times[row.name]]
        row.time_s = median(row.times_s)
        row.wall_s = median([w for _, w in times[row.name]])
    return rows


# The A/B of the direct backward: memory-saving with F and G back-propagated through autograd, as
# before it (``DirectSequential.vjp`` declining every call).
autograd_backward = functools.partial(mock.patch.object, DirectSequential, "vjp", lambda self, *args: None)
# The A/B of compiled couplings: F and G compiled call by call (``CompiledCall``), as before them
# (``FusedCoupling.usable`` declining every call).
per_call_compiled = functools.partial(mock.patch.object, FusedCoupling, "usable", lambda self, x: False)


_direct_vjp = DirectSequential.vjp


def _vjp_without_kept(self: DirectSequential, x, grad, need_input, kept=None, modules=(), casts=None):  # noqa: ANN001, ANN202
    return None if kept is not None else _direct_vjp(self, x, grad, need_input, casts=casts)


@contextlib.contextmanager
def keep_through_modules() -> Iterator[None]:
    """The A/B of direct keeping: kept outputs recorded and replayed through the module calls and an
    autograd walk, as before it (``DirectSequential.keeping`` and the kept ``vjp`` declining)."""
    with mock.patch.object(DirectSequential, "keeping", lambda self, *args: None), \
            mock.patch.object(DirectSequential, "vjp", _vjp_without_kept):
        yield


def keep_through_modules_variant(methods: Sequence[Method]) -> Method:
    """The keep variant's model run under :func:`keep_through_modules`."""
    keep = next(m for m in methods if m.name == "keep")
    return Method("keep, through modules", keep.model, keep_through_modules)


def ab_variants(methods: Sequence[Method], args: argparse.Namespace) -> list[Method]:
    """The A/B rows asked for: models of ``methods`` again under the switches above."""
    out = []
    if args.autograd_backward:
        out.append(autograd_backward_variant(methods))
    if args.keep_through_modules:
        out.append(keep_through_modules_variant(methods))
    if args.per_call_compile:
        out += per_call_variants(methods)
    return out


def per_call_variants(methods: Sequence[Method]) -> list[Method]:
    """Each F/G-compiled variant's model again under :func:`per_call_compiled`."""
    return [Method(f"{m.name}, per call", m.model, per_call_compiled) for m in methods
            if m.name in ("memory-saving F/G compiled", "compiled memory-saving F/G")]


def autograd_backward_variant(methods: Sequence[Method]) -> Method:
    """The memory-saving variant's model run under :func:`autograd_backward`."""
    memory_saving = next(m for m in methods if m.name == "memory-saving")
    return Method("memory-saving, autograd backward", memory_saving.model, autograd_backward)


def launch_suite(args: argparse.Namespace) -> list[Row]:
    torch.manual_seed(0)
    model = NarrowResNet([3, 8, 36, 3], divisor=8)
    return timed_suite("launch", model, torch.randn(1, 3, 64, 64, device=args.device), args)


def compute_suite(args: argparse.Namespace) -> list[Row]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    return timed_suite("compute", model, torch.randn(4, 3, 128, 128, device=args.device), args)


@dataclass
class OpsResult:
    rows: list[Row]
    counts: dict[str, Counter[str]]  # variant -> op -> count
    where: dict[str, Counter[tuple[str, str]]]  # variant -> (revconvert frames, op) -> count
    couplings: int


def ops_suite(args: argparse.Namespace, dtype: str = "float32") -> OpsResult:
    """Kernel-launching aten ops per resnet152 step, by variant and by the runtime code running them;
    a ``dtype`` other than float32 runs the step under autocast to it (float32 weights and input)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64, device=args.device)
    methods = variants(torchvision.models.resnet152(weights=None), x)
    amp = None if dtype == "float32" else getattr(torch, dtype)
    counters = {m.name: count_ops(m, x, where=True, amp_dtype=amp) for m in methods}
    suite = "ops" if dtype == "float32" else f"ops {dtype}"
    rows = [Row(suite, name, ops=c.total) for name, c in counters.items()]
    return OpsResult(rows, {k: c.counts for k, c in counters.items()}, {k: c.where for k, c in counters.items()},
                     couplings_of(methods[2].model))


# --------------------------------------------------------------------------------------------- #
# GPU suite
# --------------------------------------------------------------------------------------------- #
def peak_bytes(method: Method, x: torch.Tensor, amp_dtype: torch.dtype | None) -> int:
    """Highest allocated bytes during one step above those allocated before it."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(method, x, amp_dtype=amp_dtype)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    tracker = AllocationTracker()  # CPU: live storages created during the step
    with tracker:
        train_step(method, x, amp_dtype=amp_dtype)
    tracker.stop()
    return tracker.peak


def gpu_methods(args: argparse.Namespace) -> list[Method]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    original = torchvision.models.get_model(args.gpu_model, weights=None).to(device).train()
    shape = (args.gpu_batch, 3, args.gpu_size, args.gpu_size)
    converted = revconvert.convert(original, shape).to(device).train()
    keep = keep_every(revconvert.convert(original, shape, config=revconvert.ConvertConfig(keep="spatial-convs")),
                      args.keep_small).to(device).train()
    null = contextlib.nullcontext
    paired = revconvert.convert(original, shape, config=revconvert.ConvertConfig(pair_blocks=True)).to(device).train()
    methods = [Method("original", original, null),
               Method("ckpt-sequential", Checkpointed(original, per_block=False), null),
               Method("memory-saving", converted, null),
               Method("ordinary", converted, revconvert.ordinary_autograd),
               Method("keep", keep, null),
               Method("paired", paired, null)]
    if args.segment_graphs:
        # the feature: ConvertConfig(cuda_graphs=True), the same weights as the eager rows
        for name, config in (("memory-saving, cuda_graphs", revconvert.ConvertConfig(cuda_graphs=True)),
                             ("paired, cuda_graphs", revconvert.ConvertConfig(cuda_graphs=True, pair_blocks=True))):
            model = revconvert.convert(original, shape, config=config).to(device).train()
            model.load_state_dict((paired if config.pair_blocks else converted).state_dict())
            methods.append(Method(name, model, null))
    if args.graph_segments:
        # only the reversible segments captured (speedlib.GraphedSegments): an experiment
        methods += [Method("graphed segments, memory-saving", GraphedSegments(converted), null),
                    Method("graphed segments, paired", GraphedSegments(paired), null)]
    if args.cuda_graphs:
        # the whole step captured once and replayed (speedlib.GraphedStep): launch overhead gone
        methods += [Method(f"graphed {m.name}", GraphedStep(m.model), m.context) for m in methods
                    if m.name in ("original", "ckpt-sequential", "memory-saving", "ordinary", "paired")]
    if args.compile_backend != "none" and args.compile_dtypes:
        methods += [Method("compiled original", compiled(original, args.compile_backend), null),
                    Method("compiled memory-saving", compiled(converted, args.compile_backend), null),
                    # the user's torch.compile(converted) of the paired conversion: the stem, projection
                    # blocks and head compiled, the segments graph breaks that run eagerly
                    Method("compiled paired", compiled(paired, args.compile_backend), null)]
        if args.segment_graphs:  # torch.compile(converted) with the segments replaying their graphs
            graphed = next(m.model for m in methods if m.name == "paired, cuda_graphs")
            methods.append(Method("compiled paired, cuda_graphs", compiled(graphed, args.compile_backend), null))
        if args.compile_fg:
            # F and G compiled too (ConvertConfig(compile=...)): the segments are graph breaks of
            # torch.compile(converted), and this compiles inside them; the row without the outer
            # compile isolates the couplings (both share their compiled code).
            inner = revconvert.ConvertConfig(compile=fg_options(args.compile_backend, args))
            fg = revconvert.convert(original, shape, config=inner).to(device).train()
            paired_fg = revconvert.convert(original, shape, config=dataclasses.replace(inner, pair_blocks=True))
            paired_fg = paired_fg.to(device).train()
            methods += [Method("compiled memory-saving F/G", compiled(fg, args.compile_backend), null),
                        Method("memory-saving F/G compiled", fg, null),
                        Method("compiled paired F/G", compiled(paired_fg, args.compile_backend), null),
                        Method("paired F/G compiled", paired_fg, null)]
    methods += ab_variants(methods, args)
    if args.variants:
        methods = [m for m in methods if m.name in args.variants]
    return methods


class _Raises(torch.nn.Module):
    """Stands in for a model that could not be built; calling it raises the reason."""

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.exc


def compiled(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """``torch.compile(model)``; compiling is lazy, so most failures come at the first call instead."""
    try:
        return torch.compile(model, backend=backend)
    except Exception as exc:  # noqa: BLE001 - reported as the variant's row
        return _Raises(exc)


def _reserved() -> int:
    """CUDA memory reserved once the cache's unused blocks are released: live tensors and the
    private pools of captured graphs."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()


def gpu_suite(args: argparse.Namespace) -> list[Row]:
    """Per precision: warm-up (compiles), one step for the peak, then interleaved timed steps."""
    methods = gpu_methods(args)
    x = torch.randn(args.gpu_batch, 3, args.gpu_size, args.gpu_size, device=args.device)
    rows: list[Row] = []
    for dtype_name in args.dtypes:
        amp = None if dtype_name == "float32" else getattr(torch, dtype_name)
        suite = f"gpu {dtype_name}"
        live: list[Method] = []
        for m in methods:
            if m.name.startswith("compiled") and dtype_name not in args.compile_dtypes:
                continue
            row = Row(suite, m.name)
            rows.append(row)
            t0 = time.perf_counter()
            held = _reserved() if m.name.endswith("cuda_graphs") and not m.name.startswith("compiled") else None
            try:
                for i in range(args.warmup):
                    train_step(m, x, amp_dtype=amp)
                    if i == 0 and m.name.startswith("compiled"):
                        row.compile_s = time.perf_counter() - t0
                if m.name.startswith("graphed"):  # a replay allocates nothing: its peak was the capture's
                    train_step(m, x, amp_dtype=amp)
                else:
                    row.peak_bytes = peak_bytes(m, x, amp)
                if held is not None:  # what the captured graphs hold between steps counts too
                    held = _reserved() - held
                    row.peak_bytes += held
                    row.note = f"peak includes {held / 2**20:.0f} MiB the graphs hold (reserved)"
                if args.count_launches and x.device.type == "cuda":
                    row.launches = count_launches(lambda: train_step(m, x, amp_dtype=amp))  # noqa: B023
            except Exception as exc:  # noqa: BLE001 - a failed variant is a row, not a crash
                kind = "compile failed" if m.name.startswith("compiled") else "failed"
                row.error = f"{kind}: {error_line(exc)}"
                m.model.zero_grad(set_to_none=True)
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            live.append(m)
            print(f"{suite} {m.name}: warm in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            if isinstance(m.model, GraphedSegments) or held is not None:
                # gradients against the eager segments' (the row the experiment's name ends with, the
                # row the feature's name starts with)
                eager_name = m.name.rpartition(", ")[2] if held is None else m.name.partition(", ")[0]
                eager = next((e for e in methods if e.name == eager_name), None)
                if eager is not None:
                    note = f"gradient vs {eager_name}: {grad_difference(m, eager, x, amp):.1e} relative L2"
                    row.note = note if row.note is None else f"{row.note}; {note}"
                    print(f"{suite} {m.name}: {row.note}", file=sys.stderr, flush=True)
        errors: dict[str, str] = {}
        times = time_interleaved(live, lambda m: train_step(m, x, amp_dtype=amp), repeats=args.gpu_repeats,
                                 clock=args.clock_fn, errors=errors)
        for row in rows:
            if row.suite != suite or row.name not in times:
                continue
            if row.name in errors:
                row.error = f"failed while timed: {errors[row.name]}"
            else:
                row.times_s = [t for t, _ in times[row.name]]
                row.time_s = median(row.times_s)
                row.wall_s = median([w for _, w in times[row.name]])
    return rows


# --------------------------------------------------------------------------------------------- #
# targets and report
# --------------------------------------------------------------------------------------------- #
def targets(rows: Sequence[Row], dtypes: Sequence[str], compile_dtypes: Sequence[str]) -> list[Target]:
    """Issue 11's targets for every suite that ran."""
    by_suite: dict[str, list[Row]] = {}
    for r in rows:
        by_suite.setdefault(r.suite, []).append(r)
    out: list[Target] = []
    if (launch := by_suite.get("launch")) is not None:
        out += [Target("launch: memory-saving / ordinary time", ratio(launch, "memory-saving", "ordinary", "time_s"), 1.6),
                Target("launch: memory-saving / original time", ratio(launch, "memory-saving", "original", "time_s"), 2.6),
                Target("launch: keep / memory-saving time", ratio(launch, "keep", "memory-saving", "time_s"), 1.0,
                       strict=True),
                Target("launch: paired / original time", ratio(launch, "paired", "original", "time_s"), 2.6)]
        if any(r.name == "memory-saving F/G compiled" for r in launch):  # the compiled target's CPU proxy
            out.append(Target("launch: memory-saving F/G compiled / compiled original time",
                              ratio(launch, "memory-saving F/G compiled", "compiled original", "time_s"), 1.5))
    for suite in ("ops", *(f"ops {d}" for d in dtypes if d != "float32")):
        if (ops := by_suite.get(suite)) is not None:
            out += [Target(f"{suite}: memory-saving / ordinary aten ops",
                           ratio(ops, "memory-saving", "ordinary", "ops"), 1.5),
                    Target(f"{suite}: paired / paired ordinary aten ops",
                           ratio(ops, "paired", "paired ordinary", "ops"), 1.5)]
    if (comp := by_suite.get("compute")) is not None:
        out += [Target("compute: ordinary / original time", ratio(comp, "ordinary", "original", "time_s"), 1.10),
                Target("compute: memory-saving / original time", ratio(comp, "memory-saving", "original", "time_s"),
                       1.30),
                Target("compute: keep / memory-saving time", ratio(comp, "keep", "memory-saving", "time_s"), 1.0,
                       strict=True),
                Target("compute: paired ordinary / original time", ratio(comp, "paired ordinary", "original", "time_s"),
                       1.10),
                Target("compute: paired / original time", ratio(comp, "paired", "original", "time_s"), 1.30)]
    for dtype in dtypes:
        if (gpu := by_suite.get(f"gpu {dtype}")) is None:
            continue
        out += [Target(f"gpu {dtype}: memory-saving / original time, eager",
                       ratio(gpu, "memory-saving", "original", "time_s"), 1.6),
                Target(f"gpu {dtype}: memory-saving / ckpt-sequential time",
                       ratio(gpu, "memory-saving", "ckpt-sequential", "time_s"), 1.0, strict=True),
                Target(f"gpu {dtype}: memory-saving / original peak memory",
                       ratio(gpu, "memory-saving", "original", "peak_bytes"), 0.55)]
        out.append(Target(f"gpu {dtype}: keep / memory-saving time", ratio(gpu, "keep", "memory-saving", "time_s"),
                          1.0, strict=True))
        if any(r.name == "paired" for r in gpu):
            out += [Target(f"gpu {dtype}: paired / original time, eager", ratio(gpu, "paired", "original", "time_s"),
                           1.6),
                    Target(f"gpu {dtype}: paired / ckpt-sequential time",
                           ratio(gpu, "paired", "ckpt-sequential", "time_s"), 1.0, strict=True),
                    Target(f"gpu {dtype}: paired / original peak memory",
                           ratio(gpu, "paired", "original", "peak_bytes"), 0.55)]
        for name in ("memory-saving, cuda_graphs", "paired, cuda_graphs"):
            if any(r.name == name for r in gpu):
                out += [Target(f"gpu {dtype}: {name} / original time, eager",
                               ratio(gpu, name, "original", "time_s"), 1.6),
                        Target(f"gpu {dtype}: {name} / ckpt-sequential time",
                               ratio(gpu, name, "ckpt-sequential", "time_s"), 1.0, strict=True),
                        Target(f"gpu {dtype}: {name} / original peak memory (graphs' memory included)",
                               ratio(gpu, name, "original", "peak_bytes"), 0.55)]
        for name in ("graphed segments, memory-saving", "graphed segments, paired"):
            if any(r.name == name for r in gpu):
                out.append(Target(f"gpu {dtype}: {name} / original time (eager around them)",
                                  ratio(gpu, name, "original", "time_s"), 1.6))
        if any(r.name == "graphed memory-saving" for r in gpu):
            if any(r.name == "graphed paired" for r in gpu):
                out.append(Target(f"gpu {dtype}: graphed paired / graphed original time (CUDA graphs)",
                                  ratio(gpu, "graphed paired", "graphed original", "time_s"), 1.6))
            out += [Target(f"gpu {dtype}: graphed memory-saving / graphed original time (CUDA graphs)",
                           ratio(gpu, "graphed memory-saving", "graphed original", "time_s"), 1.6),
                    Target(f"gpu {dtype}: graphed memory-saving / graphed ckpt-sequential time (CUDA graphs)",
                           ratio(gpu, "graphed memory-saving", "graphed ckpt-sequential", "time_s"), 1.0,
                           strict=True)]
        if dtype in compile_dtypes:
            out.append(Target(f"gpu {dtype}: compiled memory-saving / compiled original time",
                              ratio(gpu, "compiled memory-saving", "compiled original", "time_s"), 1.5))
            for name in ("compiled paired", "compiled paired, cuda_graphs", "compiled memory-saving F/G",
                         "memory-saving F/G compiled",
                         "compiled paired F/G", "paired F/G compiled"):
                if any(r.name == name for r in gpu):
                    out.append(Target(f"gpu {dtype}: {name} / compiled original time",
                                      ratio(gpu, name, "compiled original", "time_s"), 1.5))
    return out


# --------------------------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------------------------- #
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--suites", nargs="+", choices=SUITES, default=None,
                   help="default: launch ops compute on CPU; gpu ops on CUDA")
    p.add_argument("--gpu-suite", action="store_true", help="same as --suites gpu (tiny sizes on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (CPU < 2 min; CUDA: bfloat16 only)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread",
                   help="CPU step time: thread CPU time (default) or wall time; CUDA uses events")
    p.add_argument("--gpu-model", default=None, help="gpu suite model (resnet152 on CUDA, resnet18 on CPU)")
    p.add_argument("--gpu-batch", type=int, default=None, help="gpu suite batch (32 on CUDA, 2 on CPU)")
    p.add_argument("--gpu-size", type=int, default=None, help="gpu suite image size (224 on CUDA, 64 on CPU)")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"), default=None,
                   help="gpu suite precisions (float32 bfloat16); non-float32 run under autocast")
    p.add_argument("--compile-dtypes", nargs="*", choices=("float32", "bfloat16", "float16"), default=None,
                   help="precisions with torch.compile rows (default bfloat16: each one compiles both models "
                        "again, the longest part of the suite); none: no compiled rows")
    p.add_argument("--compile-fg", action="store_true",
                   help="also a row with F and G compiled inside the segments (ConvertConfig(compile=...); in the "
                        "launch and compute suites with inductor unless --compile-backend says otherwise); "
                        "each structure of F/G compiles on its first call")
    p.add_argument("--fg-mode", default=None, choices=("default", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of the --compile-fg row (modes with CUDA graphs are refused inside segments)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the gpu suite (inductor on CUDA, aot_eager on CPU); none skips")
    p.add_argument("--autograd-backward", action="store_true",
                   help="also memory-saving with F/G back-propagated through autograd "
                        "instead of directly (the direct backward's A/B)")
    p.add_argument("--keep-through-modules", action="store_true",
                   help="also keep with its kept outputs recorded and replayed through module calls and "
                        "autograd instead of the direct calls (direct keeping's A/B)")
    p.add_argument("--keep-small", action="store_true",
                   help="the keep rows keep every 3x3 convolution, also those below MIN_KEPT_FLOPS "
                        "(in the launch proxy, where nothing is big enough to keep otherwise)")
    p.add_argument("--per-call-compile", action="store_true",
                   help="with --compile-fg: also the F/G-compiled rows with F and G compiled call by call "
                        "instead of whole couplings (the A/B of compiled couplings)")
    p.add_argument("--count-launches", action="store_true",
                   help="gpu suite on CUDA: also count each variant's kernel launches in one profiled step "
                        "(torch.profiler; adds about a second per variant)")
    p.add_argument("--graph-segments", action="store_true",
                   help="gpu suite: also memory-saving with only its reversible segments captured in CUDA graphs "
                        "(torch.cuda.make_graphed_callables; an experiment: what per-segment capture would give)")
    p.add_argument("--segment-graphs", action="store_true",
                   help="gpu suite: also memory-saving and paired converted with ConvertConfig(cuda_graphs=True) "
                        "(each segment replays captured CUDA graphs); their peak includes what the graphs hold")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="gpu suite: also each eager variant's whole step captured in a CUDA graph and replayed")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="gpu suite: only these variants (e.g. original 'compiled original')")
    p.add_argument("--top", type=int, default=15, help="rows of the op breakdown")
    p.add_argument("--json", metavar="PATH", help="also write every number as JSON")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but CUDA is not available here (torch {torch.__version__}, "
                f"torch.version.cuda={torch.version.cuda}); use --device cpu, or --gpu-suite for a CPU smoke run")
    if args.cuda_graphs and not cuda:
        p.error("--cuda-graphs needs --device cuda")
    if args.segment_graphs and not cuda:
        p.error("--segment-graphs needs --device cuda")
    if args.graph_segments and not cuda:
        p.error("--graph-segments needs --device cuda")
    if args.gpu_suite:
        args.suites = sorted(set(args.suites or ()) | {"gpu"}, key=SUITES.index)
    args.suites = args.suites or (["gpu", "ops"] if cuda else ["launch", "ops", "compute"])
    explicit_repeats = args.repeats
    if cuda:
        args.repeats = args.repeats or (5 if args.quick else 10)
        args.warmup = (2 if args.quick else 3) if args.warmup is None else args.warmup
        args.dtypes = args.dtypes or (["bfloat16"] if args.quick else ["float32", "bfloat16"])
    else:
        args.repeats = args.repeats or (9 if args.quick else 25)
        args.warmup = 1 if args.warmup is None else args.warmup
        args.dtypes = args.dtypes or ["float32", "bfloat16"]
    # on CPU the gpu suite is a smoke test of its code path: few steps unless asked for more
    args.gpu_repeats = args.repeats if cuda or explicit_repeats else 3
    args.gpu_model = args.gpu_model or ("resnet152" if cuda else "resnet18")
    args.gpu_batch = args.gpu_batch or (32 if cuda else 2)
    args.gpu_size = args.gpu_size or (224 if cuda else 64)
    if args.compile_dtypes is None:
        args.compile_dtypes = ["bfloat16"] if "bfloat16" in args.dtypes else args.dtypes[:1]
    args.compile_dtypes = [d for d in args.compile_dtypes if d in args.dtypes]
    args.fg_backend = args.compile_backend or "inductor"  # CPU timed suites: a row worth timing
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    if args.compile_backend == "none":
        args.compile_dtypes = []
    if args.warmup < 1 and "gpu" in args.suites:
        p.error("--warmup must be >= 1 for the gpu suite (the first step compiles)")
    args.clock_fn = cuda_clock if cuda else cpu_clock(args.clock)
    args.clock_label = "CUDA events" if cuda else ("thread CPU" if args.clock == "thread" else "wall")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(args.device)}"
    else:
        torch.set_num_threads(args.threads)
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    repeats = [f"{args.repeats}"] if set(args.suites) - {"gpu", "ops"} else []
    repeats += [f"{args.gpu_repeats} (gpu suite)"] if "gpu" in args.suites else []
    timing = (f", median of {' / '.join(repeats)} interleaved steps after {args.warmup} warm-up, "
              f"step time: {args.clock_label}") if repeats else ""
    setup = f"{where}, torch {torch.__version__}{timing}"
    print(f"# revconvert speed: one training step ({setup})\n", flush=True)

    rows: list[Row] = []
    counts: dict[str, Counter[str]] = {}
    where: dict[str, Counter[tuple[str, str]]] = {}
    started = time.perf_counter()
    for suite in args.suites:
        t0 = time.perf_counter()
        if suite == "launch":
            got = launch_suite(args)
            print("## launch-bound proxy: resnet152 graph, widths / 8, 1x3x64x64, float32")
            print(timed_table(got, args.clock_label))
        elif suite == "compute":
            got = compute_suite(args)
            print("## compute-bound: resnet50, 4x3x128x128, float32")
            print(timed_table(got, args.clock_label))
        elif suite == "ops":
            result = ops_suite(args)
            got, counts, where = result.rows, result.counts, result.where
            print(f"## kernel-launching aten ops per step: resnet152, 1x3x64x64, {args.device}")
            print(ops_table(got))
            print("\nmemory-saving minus ordinary, by op:\n")
            print(ops_breakdown(counts, result.couplings, args.top))
            print("\nmemory-saving: where its ops are dispatched from:\n")
            print(where_table(where["memory-saving"], result.couplings, args.top))
            for dtype in (d for d in args.dtypes if d != "float32"):  # autocast adds casts
                low = ops_suite(args, dtype)
                print(f"\n## the same step under {dtype} autocast\n")
                print(ops_table(low.rows))
                print("\nmemory-saving minus ordinary, by op:\n")
                print(ops_breakdown(low.counts, low.couplings, args.top))
                got = got + low.rows
        else:
            got = gpu_suite(args)
            print(f"## {args.gpu_model}, {args.gpu_batch}x3x{args.gpu_size}x{args.gpu_size}, "
                  f"compile backend {args.compile_backend}")
            print(gpu_table(got, args.clock_label))
        rows += got
        print(f"\n({suite}: {time.perf_counter() - t0:.0f} s)\n", flush=True)

    checks = targets(rows, args.dtypes, args.compile_dtypes)
    print("## targets (issue 11)")
    print(targets_table(checks))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    result = {"setup": setup, "device": args.device, "suites": args.suites, "repeats": args.repeats,
              "warmup": args.warmup, "rows": [asdict(r) for r in rows],
              "op_counts": {k: dict(v) for k, v in counts.items()},
              "op_counts_by_frames": {k: [[f, op, n] for (f, op), n in v.most_common()] for k, v in where.items()}, "targets": [t.to_dict() for t in checks]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
