"""What each part of a model costs under each choice: the measurements :func:`plan_memory` searches over.

A model is cut into *units*, the parts a plan decides about: a stored part (stem, a projection
block, code between blocks), a run of eligible blocks (which may become one reversible segment) and
the head. A unit's *class* is what the plan does with it:

- stored part: ``P`` (plain, autograd stores its activations), ``K`` (checkpointed) or ``K2``
  (checkpointed in two regions, ``ConvertConfig.checkpoint_split``: its backward recomputes one half
  at a time);
- run of eligible blocks: ``P`` (left as it is), ``K`` (left, each block checkpointed), ``K2`` (each
  block checkpointed in two regions), ``V`` (reversible, recomputing everything) or ``VK``
  (reversible, every coupling keeping its outputs; keeping in the last ``m`` couplings is
  interpolated between ``V`` and ``VK``);
- head: ``P`` only.

Memory is measured by a handful of whole-step fake-tensor estimates (:data:`CALIBRATIONS`), each
with one class for every stored part and one for every run. Each estimate gives, per unit, the bytes
it saves for the backward, its parameters' gradient bytes, and, from the step's backward windows,
live bytes when its backward starts and the highest point its backward reaches. What a unit saves
depends on its neighbour (the tensor between two parts is saved by whichever of them saves it
first), so every pair of neighbouring classes appears in some estimate, and a plan reads each unit's
numbers from the estimate with the same classes for it and the unit before it.

FLOPs follow from forward FLOPs per unit on meta tensors: a unit's training step costs its forward
three times (forward, gradient of the input, gradient of the weights), checkpointing (in one
region or two) adds one forward, a reversible run costs its couplings' forward four times less what kept outputs save.
The plan's final FLOPs are counted on its own converted model, not composed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .._loss import training_loss
from .._ops import FlopCount
from ..analysis.audit import analyze
from ..analysis.tracing import meta_copy
from ..passes.convert import ConvertConfig, convert, coupling_groups
from ..passes.recompute import drop_batch_norms, plan_recompute
from ..runtime._keep import KEEP_POLICIES
from .segments import segmentation
from .step import StepTimeline

__all__ = ["Unit", "Choice", "UnitSample", "Calibration", "CALIBRATIONS", "find_units", "realise",
           "step_flops"]

STORED, RUN, HEAD = "stored", "run", "head"

# (class of every stored part, class of every run) of each calibration estimate: every pair of
# neighbouring classes (stored -> run, run -> stored) occurs in one of them. "A" is the original
# model and "C" converts every run (the planner reads gradient bytes from those two).
CALIBRATIONS: dict[str, tuple[str, str]] = {
    "A": ("P", "P"), "B": ("K", "K"), "C": ("P", "V"), "D": ("P", "VK"),
    "E": ("K", "V"), "F": ("K", "P"), "G": ("P", "K"), "H": ("K", "VK"),
    "I": ("K2", "P"), "J": ("K2", "K"), "L": ("K2", "K2"), "M": ("K2", "V"), "N": ("K2", "VK"),
    "O": ("P", "K2"), "Q": ("K", "K2"),
}


@dataclass(frozen=True)
class Unit:
    """A part of the model that a plan decides about.

    Attributes:
        name: the segment name of the audit's plan (``stem``, ``layer2.0``, ``layer3.rev_1_5``, ``head``).
        kind: ``"stored"``, ``"run"`` (a run of eligible blocks) or ``"head"``.
        blocks: its residual blocks.
        pairs: a run's couplings are built from two blocks each (``ConvertConfig(pair_blocks=True)``).
    """

    name: str
    kind: str
    blocks: tuple[str, ...] = ()
    pairs: bool = False

    @property
    def couplings(self) -> list[tuple[str, ...]]:
        """The blocks of each coupling the run becomes when converted, in order."""
        return coupling_groups(self.blocks, self.pairs)

    @property
    def aliases(self) -> frozenset[str]:
        """Names the memory report's rows of this unit can carry (an unconverted checkpointed run
        has one row per block)."""
        return frozenset((self.name, *self.blocks))

    def classes(self) -> tuple[str, ...]:
        return {STORED: ("P", "K", "K2"), RUN: ("P", "K", "K2", "V", "VK"), HEAD: ("P",)}[self.kind]


@dataclass(frozen=True)
class Choice:
    """One unit's decision: its class and, for a reversible run, how many couplings (the last ones) keep."""

    cls: str
    keep: int = 0

    def label(self, unit: Unit) -> str:
        if unit.kind == RUN and self.cls == "V":
            n = len(unit.couplings)
            return "reversible" if not self.keep else f"reversible, last {self.keep} of {n} keep"
        return {"P": "stored", "K": "checkpointed", "K2": "checkpointed in two halves"}[self.cls]


@dataclass(frozen=True)
class UnitSample:
    """One unit's numbers in one calibration estimate.

    Attributes:
        saved: bytes it saves for the backward.
        grad: bytes of its parameters' gradients.
        base: live bytes when its backward starts, less what the model explains (the saved bytes of
            it and the units before it, the gradients of the units after it).
        rise: how far live bytes rise during its backward above their value when it starts.
        opened: whether its backward was seen (a unit without a backward window has none).
        forward_base: live bytes when its forward starts, less the saved bytes of the units before it.
        forward_rise: how far live bytes rise during its forward above their value when it starts.
    """

    saved: int
    grad: int
    base: int
    rise: int
    opened: bool
    forward_base: int = 0
    forward_rise: int = 0


@dataclass
class Calibration:
    """Everything the planner's peak and FLOP model needs, measured once per model and batch."""

    units: list[Unit]
    samples: dict[str, dict[str, UnitSample]]
    optimizer_offset: int | None
    resident: int
    original_peak: int
    original_saved: dict[str, int]
    fwd_original: dict[str, int]
    fwd_converted: dict[str, int]
    keep_saved_flops: dict[str, list[int]]
    original_flops: int
    keep_bytes: dict[str, list[int]] = field(default_factory=dict)
    batch: int = 1
    input_bytes: int = 0
    original_ops: int | None = None  # kernel launches of the original's step (do not depend on the batch)

    def scaled(self, batch: int) -> Calibration:
        """The calibration as if measured at ``batch``: activation-sized numbers grow with the batch,
        gradients, optimizer state and buffers do not (an approximation; plans are verified anyway).
        FLOP ratios do not depend on the batch."""
        r = batch / self.batch
        def one(s: UnitSample) -> UnitSample:
            return UnitSample(saved=round(s.saved * r), grad=s.grad, base=round(s.base * r),
                              rise=round((s.rise - s.grad) * r) + s.grad, opened=s.opened,
                              forward_base=round(s.forward_base * r), forward_rise=round(s.forward_rise * r))
        return dataclasses.replace(
            self, samples={k: {u: one(v) for u, v in d.items()} for k, d in self.samples.items()},
            resident=self.resident + round(self.input_bytes * (r - 1)), batch=batch,
            input_bytes=round(self.input_bytes * r),
            original_peak=round(self.original_peak * r),  # report only; plan() re-estimates it
            original_saved={k: round(v * r) for k, v in self.original_saved.items()},
            keep_bytes={k: [round(b * r) for b in v] for k, v in self.keep_bytes.items()})


def find_units(model: nn.Module, example: Any, trace_options: dict[str, Any], pairs: bool = False) -> list[Unit]:
    """The units of ``model`` in execution order, from the audit's segment plan (``pairs``: runs
    become couplings of two blocks each)."""
    analysis = analyze(model, example, **trace_options)
    units = []
    for plan in analysis.report.segments:
        if plan.kind == "reversible":
            units.append(Unit(plan.name, RUN, tuple(plan.blocks), pairs=pairs))
        elif plan.name in ("head", "model"):  # not checkpointed (see passes.checkpoint_stored)
            units.append(Unit(plan.name, HEAD, tuple(plan.blocks)))
        else:
            units.append(Unit(plan.name, STORED, tuple(plan.blocks)))
    return units


def realise(units: Sequence[Unit], choices: Sequence[Choice], keep_policy: str = "spatial-convs",
            base: ConvertConfig | None = None) -> ConvertConfig:
    """The ``ConvertConfig`` that converts, checkpoints and keeps as ``choices`` say."""
    only, ckpt, split, keep = [], [], [], []
    for unit, choice in zip(units, choices):
        if unit.kind == RUN and choice.cls in ("V", "VK"):
            only += unit.blocks
            couplings = unit.couplings
            m = len(couplings) if choice.cls == "VK" else choice.keep
            keep += [b for group in couplings[len(couplings) - m:] for b in group] if m else ()
        elif choice.cls in ("K", "K2"):
            names = unit.blocks if unit.kind == RUN else (unit.name,)
            ckpt += names
            split += names if choice.cls == "K2" else ()
    fields = {} if base is None else {n: getattr(base, n) for n in ("leaf_modules", "autowrap_functions",
                                                                     "concrete_args", "pair_blocks")}
    return ConvertConfig(only=tuple(only), checkpoint_stored=tuple(ckpt), checkpoint_split=tuple(split),
                         keep=keep_policy if keep else None, keep_blocks=tuple(keep) if keep else None,
                         **fields)


def calibration_choices(units: Sequence[Unit], label: str) -> list[Choice]:
    stored, run = CALIBRATIONS[label]
    return [Choice(run if u.kind == RUN else stored if u.kind == STORED else "P") for u in units]


def unit_grad_bytes(units: Sequence[Unit], timeline: StepTimeline) -> dict[str, int]:
    """Gradient bytes of each unit's parameters, as the step's segments own them (a checkpointed
    part owns none there: its run calls modules it does not register)."""
    return _per_unit(units, timeline.grad_bytes)


def _per_unit(units: Sequence[Unit], by_segment: dict[str, int]) -> dict[str, int]:
    """Per-segment figures summed into the units whose aliases name those segments."""
    of = {alias: u.name for u in units for alias in u.aliases}
    out = {u.name: 0 for u in units}
    for name, value in by_segment.items():
        if name in of:
            out[of[name]] += value
    return out


def unit_samples(units: Sequence[Unit], segments: Sequence[Any], timeline: StepTimeline,
                 grad: dict[str, int]) -> dict[str, UnitSample]:
    """Per unit: saved bytes from the report's rows, start and rise of its backward; ``grad`` gives
    each unit's gradient bytes under the classes of this step."""
    of = {alias: u.name for u in units for alias in u.aliases}
    saved = {u.name: 0 for u in units}
    for row in segments:
        if row.name in of:
            saved[of[row.name]] += row.activation_bytes
    def spans(windows: list[tuple[str, int, int]]) -> tuple[dict[str, int], dict[str, int]]:
        start: dict[str, int] = {}
        top: dict[str, int] = {}
        for label, at, peak in windows:
            unit = of.get(label)
            if unit is None:
                continue
            start.setdefault(unit, at)  # the unit's first window (in that pass's order) is where it starts
            top[unit] = max(top.get(unit, 0), peak)
        return start, top

    start, top = spans(timeline.windows)
    fstart, ftop = spans(timeline.forward_windows)
    out = {}
    for i, u in enumerate(units):
        prefix = sum(saved[v.name] for v in units[:i + 1])
        suffix = sum(grad[v.name] for v in units[i + 1:])
        opened = u.name in start
        at = start.get(u.name, 0)
        fat = fstart.get(u.name, 0)
        out[u.name] = UnitSample(saved=saved[u.name], grad=grad[u.name], base=at - prefix - suffix if opened else 0,
                                 rise=top.get(u.name, at) - at, opened=opened,
                                 forward_base=fat - (prefix - saved[u.name]) if u.name in fstart else 0,
                                 forward_rise=ftop.get(u.name, fat) - fat)
    return out


def _meta_segmented(model: nn.Module, example: tuple[int, ...], config: ConvertConfig | None,
                    trace_options: dict[str, Any]) -> tuple[fx.GraphModule, Any]:
    work = meta_copy(model).train()
    if config is not None:
        work = convert(work, example, config=config).train()
    seg = segmentation(work, example, **trace_options)
    gm = seg.graph_module.train()
    drop_batch_norms(gm)  # no counted FLOPs, and slow on meta tensors
    return gm, seg


class _SegmentFlopCount(FlopCount):
    def __init__(self) -> None:
        super().__init__()
        self.segment = ""
        self.by_segment: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
        before = self.total
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.by_segment[self.segment] = self.by_segment.get(self.segment, 0) + self.total - before
        return out


class _Attributing(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, seg: Any, counter: _SegmentFlopCount) -> None:
        super().__init__(gm)
        self.seg, self.counter = seg, counter

    def run_node(self, n: fx.Node) -> Any:
        self.counter.segment = self.seg.segment_of(n)
        return super().run_node(n)


def forward_flops(units: Sequence[Unit], model: nn.Module, example: tuple[int, ...],
                  config: ConvertConfig | None, trace_options: dict[str, Any]) -> dict[str, int]:
    """Forward FLOPs of each unit, on meta tensors."""
    gm, seg = _meta_segmented(model, example, config, trace_options)
    counter = _SegmentFlopCount()
    with torch.no_grad(), counter:
        _Attributing(gm, seg, counter).run(torch.empty(example, device="meta"))
    return _per_unit(units, counter.by_segment)


def step_flops(model: nn.Module, example: tuple[int, ...], config: ConvertConfig | None,
               trace_options: dict[str, Any]) -> int:
    """FLOPs of one training step (forward + backward) of ``model`` or its conversion by ``config``."""
    gm, _ = _meta_segmented(model, example, config, trace_options)
    with FlopCount() as counter:
        training_loss(gm(torch.empty(example, device="meta"))).backward()
    return counter.total


def keep_costs(units: Sequence[Unit], model: nn.Module, example: tuple[int, ...], keep_policy: str,
               trace_options: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per run: each coupling's recomputation FLOPs saved by keeping, and the bytes it keeps."""
    runs = [u for u in units if u.kind == RUN]
    config = ConvertConfig(only=tuple(b for u in runs for b in u.blocks), pair_blocks=any(u.pairs for u in runs),
                           **trace_options)
    work = convert(meta_copy(model).train(), example, config=config).train()
    plan = plan_recompute(work, [torch.empty(example, device="meta")], 0.0, KEEP_POLICIES[keep_policy])
    costs = {c.name: c for c in plan.costs}
    summary = work.revconvert_summary
    flops: dict[str, list[int]] = {}
    nbytes: dict[str, list[int]] = {}
    for u in runs:
        names = [f"{u.name}.couplings.{k}" for k in range(summary.couplings.get(u.name, 0))]
        flops[u.name] = [costs[n].saved_flops if n in costs else 0 for n in names]
        nbytes[u.name] = [costs[n].kept_bytes if n in costs else 0 for n in names]
    return flops, nbytes
