"""One instrumented training step, the common core of the estimate and the measurement.

The traced model runs under an ``fx.Interpreter`` that names the current segment around each node, so
the saved-tensor hooks credit what autograd stores to the segment that stored it. A gradient hook on
each segment's output marks where that segment's backward starts, which gives the transient peak of
a reversible segment's backward (recomputing one coupling). The same code runs on fake tensors
(``memory_profile``) and on real ones (``measure_memory``); only the tensors differ.

The step is a steady-state training step: parameter gradients start as ``None``
(``zero_grad(set_to_none=True)``, PyTorch's default), optimizer state already exists, the loss is the
sum of the model's outputs (a real loss adds a few bytes per sample).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from .._loss import training_loss
from .._ops import FlopCount
from .report import MemoryBreakdown, SegmentMemory
from .segments import Segmentation, SegmentInfo
from .tracker import AllocationTracker, SavedTensorCounter, Window, storage_bytes

__all__ = ["StepResources", "StepTimeline", "run_step"]

# Names of the parts of the peak, in the order they are reported.
PARAMS, BUFFERS, OPT_STATE, INPUT = "parameters", "buffers", "optimizer state", "input batch"
FORWARD, BACKWARD, OPT_STEP = "forward tensors", "backward tensors", "optimizer step"
_PHASE_PART = {"forward": FORWARD, "backward": BACKWARD, "optimizer": OPT_STEP}


@dataclass
class StepResources:
    """What exists before the step starts and is not counted as an allocation of the step.

    Attributes:
        params: the model's parameters (deduplicated).
        buffers: the model's buffers.
        optimizer_state: the optimizer's state tensors (empty when there is no optimizer).
        inputs: positional inputs of the model.
        optimizer_step: runs ``optimizer.step()`` under the tracker, or ``None`` (then
            ``modeled_step_bytes`` stands for the step's temporaries, as in the fake estimate).
        modeled_step_bytes: temporaries of the optimizer step when it is not run.
    """

    params: Sequence[torch.Tensor]
    buffers: Sequence[torch.Tensor]
    optimizer_state: Sequence[torch.Tensor]
    inputs: tuple[Any, ...]
    optimizer_step: Callable[[], None] | None = None
    modeled_step_bytes: int = 0
    optimizer_name: str | None = None


class _SegmentInterpreter(fx.Interpreter):
    """Runs the graph, telling the saved-tensor counter which segment each node belongs to."""

    def __init__(self, seg: Segmentation, counter: SavedTensorCounter,
                 on_exit_grad: Callable[[str], Callable[[torch.Tensor], None]]) -> None:
        super().__init__(seg.graph_module)
        self.seg = seg
        self.counter = counter
        self.on_exit_grad = on_exit_grad
        self.on_enter: Callable[[str], None] | None = None  # called when the forward enters a segment
        self._last: str | None = None
        # A node is a segment exit if some user belongs to another segment (or is the output).
        self.exits: set[str] = set()
        for node in seg.graph_module.graph.nodes:
            own = seg.segment_of(node)
            if any(u.op == "output" or seg.segment_of(u) != own for u in node.users):
                self.exits.add(node.name)

    def run_node(self, n: fx.Node) -> Any:
        name = self.seg.segment_of(n)
        self.counter.segment = name
        if self.on_enter is not None and name != self._last and n.op not in ("placeholder", "output"):
            self.on_enter(name)
        self._last = name
        result = super().run_node(n)
        if n.name in self.exits:
            for t in tree_leaves(result):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self.on_exit_grad(name))
        return result


def _segment_param_bytes(seg: Segmentation) -> dict[str, int]:
    """Bytes of the trainable parameters each segment owns (call_module and get_attr nodes)."""
    gm, owned, seen = seg.graph_module, {}, set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            tensors = list(gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            attr = gm
            for atom in str(node.target).split("."):
                attr = getattr(attr, atom)
            tensors = [attr] if isinstance(attr, torch.nn.Parameter) else []
        else:
            continue
        name = seg.segment_of(node)
        for p in tensors:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                owned[name] = owned.get(name, 0) + p.numel() * p.element_size()
    return owned


@dataclass
class StepTimeline:
    """Where in the step live bytes stood, for a planner that composes peaks part by part.

    Attributes:
        forward_peak: the tracked peak reached before the backward started.
        forward_end: tracked live bytes when the backward started (saved tensors, output, loss).
        windows: ``(segment, live at open, peak)`` of each backward window, in backward order.
        forward_windows: the same for the forward, from where it enters a segment to where it
            enters the next one.
        after_backward: tracked live bytes after the backward (the gradients, mostly).
        optimizer_peak: tracked peak of the optimizer step (modeled or run); 0 without one.
        grad_bytes: trainable parameter bytes each segment owns (its gradients).
    """

    forward_peak: int = 0
    forward_end: int = 0
    windows: list[tuple[str, int, int]] = field(default_factory=list)
    forward_windows: list[tuple[str, int, int]] = field(default_factory=list)
    after_backward: int = 0
    optimizer_peak: int = 0
    grad_bytes: dict[str, int] = field(default_factory=dict)


def run_step(seg: Segmentation, res: StepResources, *, timeline: StepTimeline | None = None) -> MemoryBreakdown:
    """Run forward + backward (+ optimizer step) of ``seg.graph_module`` and account for its memory.

    Parameter gradients must be ``None`` on entry; they are left populated on return. ``timeline``,
    if given, is filled in (see :class:`StepTimeline`).
    """
    timeline = timeline if timeline is not None else StepTimeline()
    opened: list[Window] = []
    params = list(res.params)
    tracker = AllocationTracker()
    tracker.mark_existing([*params, *res.buffers, *res.optimizer_state, *tree_leaves(res.inputs)])
    counter = SavedTensorCounter(exclude=[*params, *res.buffers])
    windows: dict[str, Window] = {}
    current: list[Window] = []

    def on_exit_grad(name: str) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            if current and current[-1].label == name:
                return  # several exit tensors of one segment: the window is already open
            if current:
                tracker.close_window(current.pop())
            window = tracker.open_window(name)
            windows.setdefault(name, window)
            opened.append(window)
            current.append(window)
        return hook

    interp = _SegmentInterpreter(seg, counter, on_exit_grad)
    forward_opened: list[Window] = []

    def on_enter(name: str) -> None:
        if forward_opened and not forward_opened[-1].closed:
            tracker.close_window(forward_opened[-1])
        forward_opened.append(tracker.open_window(name))

    interp.on_enter = on_enter
    cost = FlopCount()  # of forward and backward; not of the optimizer step, which the estimate models
    try:
        with tracker, counter:
            with cost:
                output = interp.run(*res.inputs)
                interp.env.clear()  # the interpreter keeps the output's value; a training loop would not
                counter.segment = "(loss)"
                loss = training_loss(output)
                counter.segment = None  # the backward's recomputation saves tensors only transiently
                del output
                if forward_opened:
                    tracker.close_window(forward_opened[-1])
                timeline.forward_peak, timeline.forward_end = tracker.peak, tracker.live
                tracker.phase = "backward"
                loss.backward()
                del loss
            if current:
                tracker.close_window(current.pop())
            after_backward = tracker.live_by_phase
            timeline.after_backward = tracker.live
            if res.optimizer_step is not None:
                tracker.phase = "optimizer"
                optimizer_window = tracker.open_window("(optimizer)")
                res.optimizer_step()
                tracker.close_window(optimizer_window)
                timeline.optimizer_peak = optimizer_window.peak
    finally:  # drop the weak references and hooks' state, which form reference cycles
        tracker.stop()
        counter.close()
        interp.env.clear()

    tracked_peak, by_phase = tracker.peak, tracker.peak_by_phase
    modeled_step_peak = sum(after_backward.values()) + res.modeled_step_bytes
    timeline.windows = [(w.label, w.start, w.peak) for w in opened]
    timeline.forward_windows = [(w.label, w.start, w.peak) for w in forward_opened]
    timeline.grad_bytes = _segment_param_bytes(seg)
    if res.optimizer_step is None and res.modeled_step_bytes:
        timeline.optimizer_peak = modeled_step_peak
    if res.optimizer_step is None and res.modeled_step_bytes and modeled_step_peak > tracked_peak:
        tracked_peak = modeled_step_peak
        by_phase = {**after_backward, "optimizer": res.modeled_step_bytes}

    param_bytes = storage_bytes(params)
    grads = [p.grad for p in params if p.grad is not None]
    resident = {
        PARAMS: param_bytes,
        BUFFERS: storage_bytes(res.buffers),
        OPT_STATE: storage_bytes(res.optimizer_state),
        INPUT: storage_bytes(t for t in tree_leaves(res.inputs) if isinstance(t, torch.Tensor)),
    }
    composition = dict(resident)
    for phase, part in _PHASE_PART.items():
        composition[part] = by_phase.get(phase, 0)

    segments = _segment_rows(seg, counter.by_segment, windows)
    return MemoryBreakdown(
        activation_bytes=counter.total,
        param_bytes=param_bytes,
        grad_bytes=storage_bytes(grads),
        optimizer_bytes=resident[OPT_STATE],
        peak_bytes=sum(resident.values()) + tracked_peak,
        segments=segments,
        buffer_bytes=resident[BUFFERS],
        input_bytes=resident[INPUT],
        peak_composition=composition,
        optimizer=res.optimizer_name,
        step_flops=cost.total,
        step_ops=cost.ops,
    )



def _segment_rows(seg: Segmentation, saved: dict[str, int], windows: dict[str, Window]) -> list[SegmentMemory]:
    """One row per planned segment; a reversible one's transient is its backward's rise in live
    bytes less its parameters' gradients (which stay)."""
    owned = _segment_param_bytes(seg)
    known = {info.name for info in seg.segments}
    # Bytes saved outside every planned segment (e.g. by the loss) get a row of their own.
    extra = [SegmentInfo(name=name, kind="stored") for name in saved if name not in known]
    rows = []
    for info in [*seg.segments, *extra]:
        transient = 0
        if info.kind == "reversible" and info.name in windows:
            transient = max(0, windows[info.name].rise - owned.get(info.name, 0))
        rows.append(SegmentMemory(name=info.name, kind=info.kind,
                                  activation_bytes=saved.get(info.name, 0), transient_bytes=transient))
    return rows
