"""Instruments of ``speed.py``: the training step, clocks, interleaved timing, an aten op counter,
the narrow ResNet-152, and the rows and targets it prints.

Kept apart from the script so that a test can import the op counter without running anything.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import Bottleneck, ResNet

import revconvert

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compare import Method  # noqa: E402 - (name, model, context), the same record compare.py uses

__all__ = ["Method", "NarrowResNet", "OpCounter", "Row", "Target", "count_ops", "cpu_clock", "cuda_clock",
           "flops_of", "median", "ratio", "time_interleaved", "train_step"]

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------- #
# the model of the launch-bound proxy
# --------------------------------------------------------------------------------------------- #
class NarrowResNet(ResNet):
    """torchvision's Bottleneck ResNet with every channel width divided by ``divisor``.

    The graph is torchvision's own (same ``forward``, same ``Bottleneck``, same strides and
    projection shortcuts); only the stem (64), the stage widths (64/128/256/512) and the head's
    input shrink, the bottleneck expansion stays 4. ``NarrowResNet([3, 8, 36, 3], divisor=8)`` is
    resnet152's graph at 1/64 of its FLOPs per pixel: on a small input every kernel is short, so a
    step's time is dominated by per-op overhead, as it is for a GPU that launches short kernels.
    """

    def __init__(self, layers: Sequence[int], *, divisor: int, num_classes: int = 1000) -> None:
        self._divisor = divisor  # read by _make_layer, which ResNet.__init__ calls
        super().__init__(Bottleneck, list(layers), num_classes=num_classes)
        # ResNet.__init__ hard-codes the stem width and the head; rebuild those two at the new width.
        stem = 64 // divisor
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.fc = nn.Linear(512 // divisor * Bottleneck.expansion, num_classes)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[Bottleneck], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        if planes == 64:  # torchvision builds layer1 first, from the stem's width
            self.inplanes = 64 // self._divisor
        return super()._make_layer(block, planes // self._divisor, blocks, stride, dilate)


# --------------------------------------------------------------------------------------------- #
# one training step, its FLOPs and its aten ops
# --------------------------------------------------------------------------------------------- #
def train_step(method: Method, x: torch.Tensor, *, amp_dtype: torch.dtype | None = None) -> None:
    """Forward, ``.float().mean()`` loss, backward, ``zero_grad(set_to_none=True)``.

    ``method.context`` (``revconvert.ordinary_autograd`` for the ordinary rows) is around the
    forward and the backward; autocast, when asked for, around the forward only.
    """
    amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with method.context():
        with amp:
            loss = method.model(x).float().mean()
        loss.backward()
    method.model.zero_grad(set_to_none=True)


def flops_of(method: Method, x: torch.Tensor) -> int:
    """FLOPs of one training step (forward + backward, recomputation included)."""
    with FlopCounterMode(display=False) as counter:
        train_step(method, x)
    return counter.get_total_flops()


# Ops that dispatch but allocate or alias without running a kernel. Views and aliases (``view``,
# ``t``, ``expand``, ``detach``, ``alias``, ``split``...) are recognised by their schema
# (``OpOverload.is_view``); these have no alias annotation but launch nothing either.
NO_KERNEL = frozenset({aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
                       aten.new_empty_strided, aten._unsafe_view, aten.lift_fresh})


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    return not func.is_view and func.overloadpacket not in NO_KERNEL


_PACKAGE = os.path.dirname(revconvert.__file__) + os.sep
OUTSIDE = "(no revconvert frame: model code, autograd engine)"


def revconvert_frames(depth: int = 2) -> str:
    """The innermost ``depth`` frames of the revconvert package on the Python stack, innermost first."""
    found = []
    frame = sys._getframe(1)
    while frame is not None and len(found) < depth:
        name = frame.f_code.co_filename
        if name.startswith(_PACKAGE):
            found.append(f"{name[len(_PACKAGE):]}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(found) or OUTSIDE


class OpCounter(TorchDispatchMode):
    """Count the aten ops that launch a kernel, by overload (``"aten.convolution.default"``).

    Entered around forward *and* ``backward()``, it sees the backward's ops too: the autograd
    engine carries dispatch modes into the backward. Ops that revconvert's keep policy hands back
    from the forward instead of running are not dispatched, so they do not count. With
    ``where=True`` it also counts (revconvert frames, op) pairs, to show which runtime code
    dispatches them.
    """

    def __init__(self, *, where: bool = False) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.where: Counter[tuple[str, str]] | None = Counter() if where else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
        if launches_kernel(func):
            self.counts[str(func)] += 1
            if self.where is not None:
                self.where[revconvert_frames(), str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_ops(method: Method, x: torch.Tensor, *, where: bool = False) -> OpCounter:
    """Kernel-launching aten ops of one training step (``.counts`` by overload, ``.where``)."""
    with OpCounter(where=where) as counter:
        train_step(method, x)
    return counter


# --------------------------------------------------------------------------------------------- #
# clocks and interleaved timing
# --------------------------------------------------------------------------------------------- #
Clock = Callable[[Callable[[], None]], tuple[float, float]]


def cpu_clock(primary: str) -> Clock:
    """(primary, wall) seconds of ``fn()``; primary is this thread's CPU time or the wall time.

    With ``torch.set_num_threads(1)`` a CPU step runs entirely on the calling thread (the autograd
    engine runs CPU backward on the caller), so its thread CPU time is the step's compute, not the
    time other processes on a shared machine took from it.
    """
    def clock(fn: Callable[[], None]) -> tuple[float, float]:
        w0, t0 = time.perf_counter(), time.thread_time()
        fn()
        t1, w1 = time.thread_time(), time.perf_counter()
        return (t1 - t0 if primary == "thread" else w1 - w0), w1 - w0
    return clock


def cuda_clock(fn: Callable[[], None]) -> tuple[float, float]:
    """(CUDA-event seconds, wall seconds) of ``fn()``, from an idle device to an idle device."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    w0 = time.perf_counter()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, time.perf_counter() - w0


def time_interleaved(methods: Sequence[Method], run: Callable[[Method], None], *, repeats: int, clock: Clock,
                     errors: dict[str, str] | None = None) -> dict[str, list[tuple[float, float]]]:
    """``repeats`` rounds, each running every method once in turn (load drifts hit all alike).

    With ``errors`` given, a method that raises is recorded there (``error_line``) and left out of
    the later rounds instead of ending the run.
    """
    times: dict[str, list[tuple[float, float]]] = {m.name: [] for m in methods}
    live = list(methods)
    for _ in range(repeats):
        for m in list(live):
            try:
                times[m.name].append(clock(lambda m=m: run(m)))
            except Exception as exc:
                if errors is None:
                    raise
                errors[m.name] = error_line(exc)
                live.remove(m)
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# --------------------------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------------------------- #
@dataclass
class Row:
    """One variant of one suite; ``None`` where the suite does not measure that quantity."""

    suite: str
    name: str
    time_s: float | None = None  # median, primary clock
    wall_s: float | None = None  # median wall time of the same steps
    times_s: list[float] = field(default_factory=list)
    flops: int | None = None
    ops: int | None = None
    peak_bytes: int | None = None
    compile_s: float | None = None  # first call of a compiled variant
    error: str | None = None


@dataclass
class Target:
    """A measured ratio against its target (``value <= limit``, or ``<`` when ``strict``)."""

    label: str
    value: float | None
    limit: float
    strict: bool = False

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value < self.limit if self.strict else self.value <= self.limit
        return "PASS" if ok else "MISS"

    def to_dict(self) -> dict:
        return {"label": self.label, "value": self.value, "limit": self.limit,
                "op": "<" if self.strict else "<=", "status": self.status}


def ratio(rows: Sequence[Row], num: str, den: str, attr: str) -> float | None:
    """``num``'s ``attr`` over ``den``'s, None when either is missing or failed."""
    by = {r.name: r for r in rows}
    a, b = by.get(num), by.get(den)
    if a is None or b is None or a.error or b.error:
        return None
    va, vb = getattr(a, attr), getattr(b, attr)
    return None if va is None or not vb else va / vb


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".replace("|", "/")  # markdown cells
