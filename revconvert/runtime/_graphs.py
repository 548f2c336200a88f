"""A reversible segment's training step as two CUDA graphs (``ReversibleSegment.cuda_graphs``).

Where kernels are short (a GPU at small batch), an eager segment waits on the host that launches its
kernels: each coupling launches F's and G's layers in the forward and again in the recomputation.
With ``cuda_graphs`` set, a segment captures its whole forward (:func:`~._function.run_forward`)
and its whole backward (:func:`~._function.run_backward`: recomputation, reconstruction and
gradients) once as two CUDA graphs, and each later step replays them: two launches instead of
thousands. The arithmetic is the eager segment's, kernel for kernel.

A graph reads and writes fixed addresses ("static" tensors). The replay Function keeps to one rule
that makes every captured step safe whatever runs between its replays (a second forward before the
backward, other segments' graphs sharing the memory pool, gradient accumulation):

- every static input is written immediately before its graph replays: the segment's input, and in
  the backward the segment's output (saved as an ordinary tensor by the forward) and its gradient;
- every static output is copied out immediately after: the forward returns a copy of the output,
  the backward fresh gradients (one multi-tensor op), which autograd accumulates as usual (DDP's
  hooks fire; a graph-owned tensor never becomes a ``.grad``).

A captured step is valid for one combination of what the kernels depend on; anything else captures
again (:class:`SegmentGraphs`): the input's shape, strides, dtype and device, autocast, the
``requires_grad`` of the input and of each parameter, every module's train/eval mode and settings
(``eps``, ``momentum``, strides, ...), the identity and address of every parameter and buffer (so
``.to()`` or a replaced tensor captures again), and the cuDNN/TF32/determinism flags. The warm-up
runs that precede a capture update norm statistics; they are put back, so the statistics move once
per replayed step, as they do eagerly.

The segment runs eagerly, as before, where a graph cannot reproduce the eager step (each named in a
warning, once per segment): not on CUDA, F or G draw random numbers, ``keep`` or ``compile`` is
set, a norm with ``momentum=None`` (it reads its counter on the host), a module hook or a replaced
``forward``, or a capture that failed. It runs eagerly without a warning while something watches the
ops (a ``TorchDispatchMode`` such as ``FlopCounterMode``, a ``TorchFunctionMode``, saved-tensor hooks
such as checkpointing's, tracing) or while the stream is already being captured.

The capture is a backend (:data:`BACKENDS`, by device type) so that the orchestration is tested on
machines without a GPU: a test backend re-runs the captured function on replay and copies into the
captured outputs, the static-memory semantics of a CUDA graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ._direct import call_replaced, global_module_hooks, hook_dicts
from ._function import DOUBLE_BACKWARD_MESSAGE, ForwardRecord, Plan, run_backward, run_forward
from ._state import autocast_as, capture_autocast

#: Eager runs before a capture (CUDA graphs need the kernels' lazy initialisation, e.g. cuDNN's
#: algorithm choice, done outside the capture).
WARMUPS = 2
#: Captured steps kept per segment (input shapes, autocast states, train/eval modes); the least
#: recently used is dropped beyond this.
MAX_STEPS = 4

_SCALARS = (bool, int, float, str, tuple, type(None))


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    """How a device captures and replays: ``warmup(device)`` is the context the warm-up runs in,
    ``capture(fn, device)`` returns a graph and ``fn``'s outputs, which each replay rewrites in place,
    and ``capturing(device)`` says whether the current stream is being captured already."""

    def warmup(self, device: torch.device) -> contextlib.AbstractContextManager: ...
    def capture(self, fn: Callable[[], tuple], device: torch.device) -> tuple[Graph, tuple]: ...
    def capturing(self, device: torch.device) -> bool: ...


class CudaBackend:
    """``torch.cuda.CUDAGraph``: warm-ups and captures on one side stream per device (as
    ``torch.cuda.make_graphed_callables`` does: some libraries' handles are per stream), every
    capture in one memory pool per device (safe here: each graph's static inputs are written just
    before it replays and its outputs copied just after, and graphs never replay concurrently).

    Captures restrict only this thread (``capture_error_mode="thread_local"``): they happen lazily,
    in the middle of training, where other threads use CUDA (a DataLoader's pin-memory thread
    allocates pinned memory), which the default mode would let break the capture and poison that
    thread. Work issued on the capturing stream is captured whichever thread issues it.
    """

    def __init__(self) -> None:
        self._pools: dict[int, Any] = {}
        self._streams: dict[int, torch.cuda.Stream] = {}

    def _side(self, device: torch.device) -> tuple[int, torch.cuda.Stream]:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(index)
            self._pools[index] = torch.cuda.graph_pool_handle()
        return index, self._streams[index]

    @contextlib.contextmanager
    def warmup(self, device: torch.device) -> Iterator[None]:
        index, side = self._side(device)
        current = torch.cuda.current_stream(index)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                yield
        finally:  # also after a failure: what follows (putting the buffers back) must come after it
            current.wait_stream(side)

    def capture(self, fn: Callable[[], tuple], device: torch.device) -> tuple[Graph, tuple]:
        index, side = self._side(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(index), torch.cuda.graph(graph, pool=self._pools[index], stream=side,
                                                             capture_error_mode="thread_local"):
            outputs = fn()
        return graph, outputs

    def capturing(self, device: torch.device) -> bool:
        return torch.cuda.is_current_stream_capturing()


#: The capture backend of each device type; a device type not here runs segments eagerly.
BACKENDS: dict[str, GraphBackend] = {"cuda": CudaBackend()}


@dataclass(eq=False)
class CapturedStep:
    """One captured forward and backward with their static tensors. ``static_grads``: the input's
    gradient, then one per parameter (None where none is needed)."""

    forward: Graph
    backward: Graph
    static_x: torch.Tensor
    static_y: torch.Tensor
    static_gy: torch.Tensor
    static_grads: tuple[torch.Tensor | None, ...]


class GraphedFunction(torch.autograd.Function):
    """``y = segment(x)`` by replaying a :class:`CapturedStep`; stores only ``y``, like
    :class:`~._function.ReversibleFunction`, whose arithmetic the graphs hold."""

    @staticmethod
    def forward(ctx, step: CapturedStep, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        step.static_x.copy_(x)
        step.forward.replay()
        y = step.static_y.clone()
        ctx.step = step
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        step: CapturedStep = ctx.step
        (y,) = ctx.saved_tensors
        step.static_y.copy_(y)  # another replay may have rewritten it since this step's forward
        step.static_gy.copy_(grad_y)
        step.backward.replay()
        present = [g for g in step.static_grads if g is not None]
        fresh = iter(torch._foreach_mul(present, 1) if present else ())  # copies, in one op
        return (None, *(None if g is None else next(fresh) for g in step.static_grads))


class SegmentGraphs:
    """One segment's captured steps, by key (see the module docstring), and the reasons it ran
    eagerly that were already reported."""

    def __init__(self) -> None:
        self.steps: OrderedDict[tuple, CapturedStep] = OrderedDict()
        self.failed: set[tuple] = set()
        self.warned: set[str] = set()
        self.identity: tuple | None = None
        self.captures = 0  # captured steps made, for tests and benchmarks
        self._plan: Plan | None = None
        self._modules: tuple[nn.Module, ...] = ()
        self._buffer_dicts: tuple[dict, ...] = ()
        self._settings: tuple[tuple[Callable[[dict], Any], dict], ...] = ()
        self._hook_dicts: tuple[dict, ...] = ()
        self._attrs: tuple[dict, ...] = ()
        self._refusal: str | None = None

    def _prepare(self, segment: nn.Module, plan: Plan) -> None:
        """What depends on the modules only, once per plan (the plan is remade when modules change)."""
        self._plan = plan
        self._modules = tuple(segment.modules())
        # The dicts, read at each step: .to() and .float() put new tensors in them without
        # registering anything (no new plan)
        self._buffer_dicts = tuple(m._buffers for m in self._modules)
        # each module's settings (public attributes of plain types: eps, momentum, stride, ...), read
        # through one getter per module (reading every attribute at each step costs milliseconds)
        settings = []
        for m in self._modules:
            names = [k for k, v in m.__dict__.items() if k != "training" and not k.startswith("_")
                     and type(v) in _SCALARS]
            if names:
                settings.append((operator.itemgetter(*names), m.__dict__))
        self._settings = tuple(settings)
        self._hook_dicts = hook_dicts(self._modules)
        self._attrs = tuple(m.__dict__ for m in self._modules)
        self._refusal = _refusal(plan, self._modules)

    def step_for(self, segment: nn.Module, plan: Plan, x: torch.Tensor) -> CapturedStep | None:
        """The captured step to replay for ``x``, capturing it if needed; None: run eagerly."""
        if plan is not self._plan:
            self._prepare(segment, plan)
        if _observed():  # e.g. memory_profile's fake tensors: the estimate is the eager step's
            return None
        backend = BACKENDS.get(x.device.type)
        if backend is None:
            return self._eager(f"runs on {x.device.type}: CUDA graphs need a CUDA device")
        if self._refusal is not None:
            return self._eager(self._refusal)
        if backend.capturing(x.device):
            return None
        if any(self._hook_dicts) or global_module_hooks() or any(map(call_replaced, self._attrs)):
            return self._eager("a module in it has hooks or a replaced forward, which a graph would skip")
        buffers = tuple(b for d in self._buffer_dicts for b in d.values() if b is not None)
        identity = self._identity((*plan.params, *buffers))
        if identity != self.identity:  # modules or tensors changed: every captured step is stale
            self.steps.clear()
            self.failed.clear()
            self.identity = identity
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad, capture_autocast(),
               tuple(m.training for m in self._modules), tuple(p.requires_grad for p in plan.params))
        step = self.steps.get(key)
        if step is not None:
            self.steps.move_to_end(key)
            return step
        if key in self.failed:
            return None
        needs = (x.requires_grad, *(p.requires_grad for p in plan.params))
        try:
            step = _capture(backend, plan, x, needs, buffers)
        except Exception as error:  # noqa: BLE001 - any failure means: run this key eagerly
            self.failed.add(key)
            self._eager(f"its capture failed ({type(error).__name__}: {error})")
            return None
        self.captures += 1
        self.steps[key] = step
        if len(self.steps) > MAX_STEPS:
            self.steps.popitem(last=False)
        return step

    def _identity(self, tensors: tuple[torch.Tensor, ...]) -> tuple:
        settings = tuple(get(attrs) for get, attrs in self._settings)
        cudnn = torch.backends.cudnn
        flags = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32,
                 torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled())
        return (tuple(map(id, tensors)), tuple(t.data_ptr() for t in tensors), tuple(t.dtype for t in tensors),
                settings, flags)

    def _eager(self, reason: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"ReversibleSegment(cuda_graphs=True) runs eagerly: {reason}", stacklevel=_caller_level())
        return None


_INSIDE = (os.path.dirname(os.path.dirname(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside revconvert and torch, seen from the caller: the
    line of the caller's code that ran the model."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def _refusal(plan: Plan, modules: Sequence[nn.Module]) -> str | None:
    """Why a graph could not reproduce this plan's eager step, whatever the input; None: it can."""
    if plan.compile_options is not None:
        return "compile is set (torch.compile's own graphs run instead)"
    if plan.random:
        return "F or G draws random numbers, whose replay needs the generators' state on the host"
    if any(c.keep is not None for c in plan.couplings):
        return "keep is set"
    if any(isinstance(m, _NormBase) and m.momentum is None and m.track_running_stats for m in modules):
        return "a norm has momentum=None, which reads its batch counter on the host"
    return None


def _observed() -> bool:
    """Whether something watches the ops, which a replay would bypass."""
    return bool(torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
                or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
                or torch._C._get_tracing_state())


def _capture(backend: GraphBackend, plan: Plan, x: torch.Tensor, needs: tuple[bool, ...],
             buffers: Sequence[torch.Tensor]) -> CapturedStep:
    """Warm up, then capture the forward and the backward of ``plan`` on ``x``'s kind of input. The
    buffers (norm statistics, counters) are put back afterwards: the warm-ups changed them."""
    with torch.no_grad():
        snapshot = [b.clone() for b in buffers]
    try:
        # the current autocast state with its weight cache off: a cached cast made during a capture
        # would outlive it (the eager casts of a segment's direct calls do not use the cache)
        uncached = dataclasses.replace(capture_autocast(), cache_enabled=False)
        with torch.no_grad(), autocast_as(uncached):
            static_x = torch.empty_like(x)
            static_x.copy_(x)  # real values: the warm-ups run
            with backend.warmup(x.device):
                for _ in range(WARMUPS):
                    y, record = run_forward(plan, static_x)
                    run_backward(plan, record, y, torch.zeros_like(y), needs)
            static_gy = torch.zeros_like(y)
            del y, record
            records: list[ForwardRecord] = []

            def forward() -> tuple:
                out, rec = run_forward(plan, static_x)
                records[:] = [rec]
                return (out,)

            forward_graph, (static_y,) = backend.capture(forward, x.device)
            record = records[0]

            def backward() -> tuple:
                grad_x, param_grads = run_backward(plan, record, static_y, static_gy, needs)
                return (grad_x, *param_grads)

            backward_graph, static_grads = backend.capture(backward, x.device)
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, snapshot):
                buffer.copy_(saved)
    return CapturedStep(forward_graph, backward_graph, static_x, static_y, static_gy, tuple(static_grads))
