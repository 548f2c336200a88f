"""Instruments of ``speed.py``: the training step, clocks, interleaved timing, an aten op counter,
the narrow ResNet-152, and the rows, targets and tables it prints.

Kept apart from the script so that a test can import the op counter without running anything.
"""

from __future__ import annotations

import contextlib
import copy
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
from revconvert._ops import launches_kernel  # the same definition as memory_profile's step_ops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compare import Method  # noqa: E402 - (name, model, context), the same record compare.py uses

__all__ = ["LAUNCH_CALLS", "GraphedSegments", "GraphedStep", "Method", "NarrowResNet", "OpCounter", "Row", "Target", "backward_step", "count_launches", "count_ops", "cpu_clock", "cuda_clock",
           "error_line", "flops_of", "gpu_table", "median", "ops_breakdown", "ops_table", "ratio", "targets_table",
           "time_interleaved", "timed_table", "train_step", "where_table"]


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
    backward_step(method, x, amp_dtype=amp_dtype)
    method.model.zero_grad(set_to_none=True)


def backward_step(method: Method, x: torch.Tensor, *, amp_dtype: torch.dtype | None = None) -> None:
    """:func:`train_step` without its ``zero_grad``: the gradients stay in the model."""
    amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with method.context():
        with amp:
            loss = method.model(x).float().mean()
        loss.backward()


class GraphedStep(nn.Module):
    """A whole training step of ``model`` (forward, ``.float().mean()`` loss, backward) captured in
    one CUDA graph at the first call and replayed at every later one.

    Called by ``train_step`` like a model: ``forward(x)`` replays the captured step on ``x``
    (copied into the captured input unless it is that tensor) and returns the loss as a fresh leaf, so
    the caller's ``backward()`` and ``zero_grad()`` cost nothing and touch nothing. The gradients land
    in ``model``'s ``.grad`` tensors, which the graph owns. ``model`` is deliberately not a
    submodule: ``zero_grad(set_to_none=True)`` on this wrapper must not drop them. One graph per
    autocast state; a new state captures anew and frees the old graph. The capture runs inside the
    caller's context (``ordinary_autograd`` for the ordinary rows) and autocast, whose weight cache is
    turned off for it (a cached cast would outlive the capture).

    This is the standard whole-network capture recipe (three warm-up steps on a side stream, then
    ``torch.cuda.graph``): what a step costs once per-kernel launch overhead is gone.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "inner", model)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.static_x: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        enabled = torch.is_autocast_enabled("cuda")
        amp = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) if enabled
               else contextlib.nullcontext())
        with amp:
            loss = self.inner(x).float().mean()
        loss.backward()
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), tuple(x.shape), x.dtype)
        if self.graph is None or key != self.key:
            self.graph = self.static_loss = None
            torch.cuda.empty_cache()
            self.static_x = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.inner.zero_grad(set_to_none=True)
                    self._step(self.static_x)
            torch.cuda.current_stream().wait_stream(side)
            self.inner.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                # detached: the captured loss must not keep the autograd graph (and its AccumulateGrad
                # nodes, bound to the capture stream) alive into other variants' steps
                self.static_loss = self._step(self.static_x).detach()
            self.graph, self.key = graph, key
        if x is not self.static_x:
            self.static_x.copy_(x)
        self.graph.replay()
        return self.static_loss.detach().requires_grad_()


class GraphedSegments(nn.Module):
    """A copy of ``model`` (a conversion) whose reversible segments run their forward and backward as
    CUDA graphs, captured by ``torch.cuda.make_graphed_callables`` at the first call, while the stem,
    the projection blocks and the head stay eager: what capturing only the segments would cost.

    An experiment for ``speed.py --graph-segments``, not a recipe: a graphed callable's output and
    gradients live in the graphs' static memory, overwritten by the next replay, which is safe for one
    forward and one backward per step as here and for nothing else. The segments are captured
    together (one memory pool, in forward order), under the caller's autocast with its weight cache
    off; a new autocast state or input shape captures anew.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(model)  # the other rows keep their eager segments
        self.segments = [m for m in self.inner.modules() if isinstance(m, revconvert.ReversibleSegment)]
        self.key: tuple | None = None

    def _capture(self, x: torch.Tensor) -> None:
        for seg in self.segments:  # eager again (a new key): the graphed forward is an instance attribute
            seg.__dict__.pop("forward", None)
        torch.cuda.empty_cache()
        inputs: dict[int, torch.Tensor] = {}
        hooks = [seg.register_forward_pre_hook(lambda m, args, k=k: inputs.__setitem__(k, args[0]))
                 for k, seg in enumerate(self.segments)]
        try:
            with torch.no_grad():
                self.inner(x)  # each segment's input shape and dtype under this autocast state
        finally:
            for hook in hooks:
                hook.remove()
        samples = tuple((torch.randn_like(inputs[k]).requires_grad_(),) for k in range(len(self.segments)))
        amp = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
               if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
        with amp:
            torch.cuda.make_graphed_callables(tuple(self.segments), samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), tuple(x.shape), x.dtype)
        if key != self.key:
            self._capture(x)
            self.key = key
        return self.inner(x)


def grad_difference(a: Method, b: Method, x: torch.Tensor, amp_dtype: torch.dtype | None) -> float:
    """Relative L2 difference of the parameter gradients of one step of ``a`` and of ``b`` (models with
    the same parameters in the same order)."""
    grads = []
    for m in (a, b):
        backward_step(m, x, amp_dtype=amp_dtype)
        grads.append(torch.cat([p.grad.detach().flatten().double() for p in m.model.parameters()]))
        m.model.zero_grad(set_to_none=True)
    return float((grads[0] - grads[1]).norm() / grads[1].norm())


def flops_of(method: Method, x: torch.Tensor) -> int:
    """FLOPs of one training step (forward + backward, recomputation included)."""
    with FlopCounterMode(display=False) as counter:
        train_step(method, x)
    return counter.get_total_flops()


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


def count_ops(method: Method, x: torch.Tensor, *, where: bool = False,
              amp_dtype: torch.dtype | None = None) -> OpCounter:
    """Kernel-launching aten ops of one training step (``.counts`` by overload, ``.where``), under
    autocast to ``amp_dtype`` if given."""
    with OpCounter(where=where) as counter:
        train_step(method, x, amp_dtype=amp_dtype)
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
    launches: int | None = None  # CUDA kernel (and graph) launches of one step, from the profiler
    error: str | None = None
    note: str | None = None  # printed after the gpu table


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


# --------------------------------------------------------------------------------------------- #
# tables
# --------------------------------------------------------------------------------------------- #
def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.1f}"


def table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    align = ["---"] + ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def timed_table(rows: Sequence[Row], clock_label: str) -> str:
    body = [[r.name, _ms(r.time_s), _x(ratio(rows, r.name, "original", "time_s")), _ms(r.wall_s),
             f"{r.flops / 1e9:.3f}", _x(ratio(rows, r.name, "original", "flops")),
             _x(ratio(rows, r.name, "ordinary", "flops"))] for r in rows]
    return table(["variant", f"ms/step ({clock_label})", "vs original", "wall ms/step", "GFLOPs/step",
                  "vs original", "vs ordinary"], body)


def ops_table(rows: Sequence[Row]) -> str:
    body = [[r.name, str(r.ops), _x(ratio(rows, r.name, "original", "ops")),
             _x(ratio(rows, r.name, "ordinary", "ops"))] for r in rows]
    return table(["variant", "aten ops/step", "vs original", "vs ordinary"], body)


def ops_breakdown(counts: dict[str, Counter[str]], couplings: int, top: int) -> str:
    """The ops the memory-saving step runs more (or fewer) times than the ordinary one."""
    diff = Counter(counts["memory-saving"])
    diff.subtract(counts["ordinary"])
    changed = sorted(((n, op) for op, n in diff.items() if n), key=lambda t: (-abs(t[0]), t[1]))
    body = [[op, str(counts["ordinary"][op]), str(counts["memory-saving"][op]), f"{n:+d}", f"{n / couplings:+.2f}"]
            for n, op in changed[:top]]
    total = sum(diff.values())
    body.append(["total", str(sum(counts["ordinary"].values())), str(sum(counts["memory-saving"].values())),
                 f"{total:+d}", f"{total / couplings:+.2f}"])
    return table(["aten op", "ordinary", "memory-saving", "difference", f"per coupling ({couplings})"], body)


def where_table(where: Counter[tuple[str, str]], couplings: int, top: int) -> str:
    """Ops by the innermost revconvert frames that dispatched them, most first."""
    by_frames: dict[str, Counter[str]] = {}
    for (frames, op), n in where.items():
        by_frames.setdefault(frames, Counter())[op] += n
    ranked = sorted(by_frames.items(), key=lambda kv: -sum(kv[1].values()))
    body = []
    for frames, ops in ranked[:top]:
        total = sum(ops.values())
        common = ", ".join(f"{op.removeprefix('aten.')} {n}" for op, n in ops.most_common(4))
        body.append([frames, str(total), f"{total / couplings:.2f}", common])
    return table(["where (innermost revconvert frames)", "ops", "per coupling", "most frequent"], body)


def gpu_table(rows: Sequence[Row], clock_label: str) -> str:
    body = []
    for r in rows:
        same = [s for s in rows if s.suite == r.suite]
        if r.error:
            body.append([r.suite, r.name, r.error, "", "", "", "", "", ""])
            continue
        peak = "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        compile_s = "" if r.compile_s is None else f"{r.compile_s:.1f}"
        launches = "" if r.launches is None else str(r.launches)
        body.append([r.suite, r.name, _ms(r.time_s), _x(ratio(same, r.name, "original", "time_s")), peak,
                     _x(ratio(same, r.name, "original", "peak_bytes")), launches,
                     _x(ratio(same, r.name, "original", "launches")), compile_s])
    notes = "".join(f"\n{r.suite} {r.name}: {r.note}" for r in rows if r.note)
    return table(["precision", "variant", f"ms/step ({clock_label})", "vs original", "peak MiB", "vs original",
                  "launches", "vs original", "compile s"], body) + notes


# The host calls that start work on the GPU, as the profiler names them: each one is a launch the
# host pays for (a CUDA graph's replay is one, whatever it holds).
LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                          "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cudaMemsetAsync", "cudaMemcpyAsync"})


def count_launches(fn: Callable[[], None]) -> int | None:
    """Host-side launches (:data:`LAUNCH_CALLS`) of one call of ``fn``, from ``torch.profiler``; None
    without CUDA. Deterministic for a given code path: the launch-bound step's cost in units."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key in LAUNCH_CALLS)


def targets_table(items: Sequence[Target]) -> str:
    body = [[t.label, "" if t.value is None else f"{t.value:.3f}", f"{'<' if t.strict else '<='} {t.limit}",
             t.status] for t in items]
    return table(["ratio", "measured", "target", "result"], body)
