"""Recompute budget: which couplings keep outputs so the backward's recomputation fits a FLOP budget.

A converted model's memory-saving backward recomputes F and G of every coupling (and, with
``checkpoint_stored``, the stored parts): about a third more FLOPs per training step than ordinary
autograd. A coupling can instead keep the outputs of some ops from the forward (``coupling.keep``,
see :mod:`revconvert.runtime._keep`); each kept coupling trades bytes for FLOPs at its own rate.
:func:`plan_recompute` measures, on meta tensors, the step's FLOPs with and without recomputation and
what keeping costs and saves in each coupling, then keeps the couplings with the fewest bytes per
saved FLOP first until the step fits the budget. Conv FLOPs per output byte do not depend on the batch
size, so the plan made at the example input holds for any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._loss import training_loss
from .._ops import FlopCount
from ..analysis.hooks import no_global_hooks
from ..analysis.tracing import meta_copy
from ..runtime import ReversibleSegment, ordinary_autograd
from ..runtime._keep import KeepPolicy, recording, replaying

__all__ = ["CouplingCost", "RecomputePlan", "drop_batch_norms", "plan_recompute"]


@dataclass(frozen=True)
class CouplingCost:
    """What keeping one coupling's selected outputs costs and saves, at the example input.

    Attributes:
        name: ``"<segment>.couplings.<k>"``, the coupling's qualified module name.
        kept_bytes: bytes of the outputs it would keep (saved for backward).
        saved_flops: forward FLOPs of those ops, no longer recomputed in the backward.
    """

    name: str
    kept_bytes: int
    saved_flops: int

    @property
    def bytes_per_flop(self) -> float:
        return self.kept_bytes / self.saved_flops if self.saved_flops else float("inf")


@dataclass
class RecomputePlan:
    """The outcome of :func:`plan_recompute`.

    Attributes:
        budget: the allowed extra FLOPs per step, as a fraction of the ordinary-autograd step.
        ordinary_flops: FLOPs of one training step (forward + backward) under ordinary autograd.
        recompute_flops: FLOPs the memory-saving backward adds when nothing is kept.
        kept: names of the couplings chosen to keep their outputs, in model order.
        kept_bytes: bytes they keep at the example input.
        saved_flops: recomputation FLOPs they save at the example input.
        costs: every coupling's cost, in model order.
        ordinary_saved_bytes: bytes saved for backward by the step under ordinary autograd (about
            what the original model saves), parameters and buffers excluded.
        recompute_saved_bytes: the same for the memory-saving step when nothing is kept (the
            default conversion).
    """

    budget: float
    ordinary_flops: int
    recompute_flops: int
    kept: list[str] = field(default_factory=list)
    kept_bytes: int = 0
    saved_flops: int = 0
    costs: list[CouplingCost] = field(default_factory=list)
    ordinary_saved_bytes: int = 0
    recompute_saved_bytes: int = 0

    @property
    def saved_bytes(self) -> int:
        """Bytes the planned model saves for backward at the example input."""
        return self.recompute_saved_bytes + self.kept_bytes

    @property
    def overhead(self) -> float:
        """Extra FLOPs per step of the planned model, as a fraction of the ordinary step."""
        return (self.recompute_flops - self.saved_flops) / self.ordinary_flops

    @property
    def met(self) -> bool:
        return self.overhead <= self.budget + 1e-12


def _step_cost(model: nn.Module, args: Sequence[Any]) -> tuple[int, int]:
    """FLOPs of one training step, and the bytes its forward saves for backward (once per storage,
    parameters and buffers excluded)."""
    skip = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}
    alive = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        alive.append(storage)  # keeps storage ids unique while counting
        if storage._cdata not in skip:
            saved[storage._cdata] = storage.nbytes()
        return t

    with FlopCount() as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = training_loss(model(*args))
        loss.backward()
    return counter.total, sum(saved.values())


def _coupling_costs(model: nn.Module, args: Sequence[Any], policy: KeepPolicy) -> list[CouplingCost]:
    """Each coupling's kept bytes and saved FLOPs, from its F and G run on meta halves."""
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, ReversibleSegment):
            handles.append(module.register_forward_pre_hook(
                lambda mod, a, name=name: inputs.__setitem__(name, a[0])))
    with torch.no_grad():
        model(*args)
    for h in handles:
        h.remove()

    costs = []
    for seg_name, x in inputs.items():
        seg = model.get_submodule(seg_name)
        with torch.no_grad():
            x1, x2 = torch.empty_like(x).chunk(2, seg.dim % x.dim())
            for k, coupling in enumerate(seg.couplings):
                kept_bytes = saved = 0
                for fn, arg in zip(coupling.functions, (x2, x1)):
                    # The runtime's own mechanism, so the plan keeps exactly what a step will keep.
                    with recording(policy, fn, keep_small=True) as kept:
                        fn(arg)
                    with FlopCount() as full:
                        fn(arg)
                    with FlopCount() as replayed, replaying(policy, fn, kept, f"{seg_name}.couplings[{k}]"):
                        fn(arg)
                    kept_bytes += sum(t.numel() * t.element_size() for t in kept.saved())
                    saved += full.total - replayed.total
                costs.append(CouplingCost(f"{seg_name}.couplings.{k}", kept_bytes, saved))
    return costs


class _FreshLike(nn.Module):
    """A stand-in for a batch norm on meta tensors: a new tensor of the input's shape with autograd
    history (as the norm's output is), so an in-place op after it leaves the input alone; no
    counted FLOPs, no compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def drop_batch_norms(model: nn.Module) -> None:
    """Replace batch norms by fresh-tensor stand-ins in a meta copy: they cost no counted FLOPs and
    keep shapes, and batch norm on meta tensors runs a Python decomposition that dominates the
    planning time."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _FreshLike())


def plan_recompute(model: nn.Module, example_args: Sequence[Any], budget: float,
                   policy: KeepPolicy) -> RecomputePlan:
    """Choose the couplings of a converted ``model`` that keep outputs, to fit ``budget``.

    ``model`` is not run or modified: a meta copy is, with its batch norms replaced by identities
    (they keep shapes and add no counted FLOPs; a ``policy`` that keeps norm outputs is therefore
    planned as keeping nothing there). Couplings are kept in increasing order of
    bytes per saved FLOP until the step's extra FLOPs are at most ``budget`` times those of the
    ordinary step; if keeping every coupling is not enough, every coupling is kept and
    ``plan.met`` is False.

    Args:
        model: a converted model (with :class:`ReversibleSegment` submodules).
        example_args: positional inputs (real or meta tensors) whose shapes the plan is made at.
        budget: allowed extra FLOPs per training step, as a fraction of the ordinary step (>= 0).
        policy: which ops a kept coupling keeps (see ``ReversibleCoupling(keep=...)``).
    """
    meta = meta_copy(model).train(model.training)
    drop_batch_norms(meta)
    for module in meta.modules():
        if isinstance(module, ReversibleSegment):
            for coupling in module.couplings:
                coupling.keep = None
    args = [a.detach().to("meta").requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in example_args]
    with no_global_hooks():  # the steps run on meta tensors: no hook of the caller's may see them
        with ordinary_autograd():
            ordinary, ordinary_saved = _step_cost(meta, args)
        full, full_saved = _step_cost(meta, args)
        costs = _coupling_costs(meta, args, policy)
    plan = RecomputePlan(budget=budget, ordinary_flops=ordinary, recompute_flops=full - ordinary,
                         costs=costs, ordinary_saved_bytes=ordinary_saved, recompute_saved_bytes=full_saved)
    order = {c.name: i for i, c in enumerate(plan.costs)}
    # Cheapest bytes per saved FLOP first; among equals, the later coupling (its backward runs first).
    for cost in sorted(plan.costs, key=lambda c: (c.bytes_per_flop, -order[c.name])):
        if plan.met or not cost.saved_flops:
            break
        plan.kept.append(cost.name)
        plan.kept_bytes += cost.kept_bytes
        plan.saved_flops += cost.saved_flops
    plan.kept.sort(key=order.__getitem__)
    return plan
