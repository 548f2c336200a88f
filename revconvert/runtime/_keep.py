"""Keeping chosen outputs of F and G from the forward, so the backward's recomputation skips those ops.

The recomputation of a coupling re-runs every op of F and G. Some ops are worth keeping instead: a 3x3
convolution of a bottleneck does about half its FLOPs while its output is the block's narrowest
tensor. A *keep policy* says which ops. In the forward, :class:`Record` (a ``TorchDispatchMode``)
stores the outputs of those ops, in call order; in the recomputation, :class:`Replay` hands them back
instead of running the op. Both modes sit below autograd, so the recomputed graph still records the
op's backward node (e.g. ``ConvolutionBackward0`` with its input and weight): gradients are those of
ordinary autograd, only the op's forward is not run a second time. The same mechanism backs PyTorch's
selective activation checkpointing; here it is applied to reversible couplings.

Kept tensors are saved through ``ctx.save_for_backward``, so saved-tensor hooks (and revconvert's
memory tools) count them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KEEP_POLICIES", "KeepPolicy", "keep_spatial_convolutions", "resolve_keep"]

KeepPolicy = Callable[[Any, tuple, dict], bool]
"""``policy(func, args, kwargs) -> bool``: keep the output of this aten op call (``func`` is an
``OpOverload`` such as ``torch.ops.aten.convolution.default``; ``args`` are its tensor arguments)."""


def keep_spatial_convolutions(func: Any, args: tuple, kwargs: dict) -> bool:
    """Keep convolutions whose kernel is larger than 1x1 (the 3x3 convs of basic and bottleneck blocks).

    Per byte kept they save the most recomputation: a convolution's FLOPs per output element are
    ``2 * C_in / groups * kernel area``, so a 3x3 conv saves nine times what a 1x1 conv of the same
    width saves for the same bytes.
    """
    if func is not torch.ops.aten.convolution.default:
        return False
    weight = args[1]
    return weight.dim() > 2 and math.prod(weight.shape[2:]) > 1


KEEP_POLICIES: dict[str, KeepPolicy] = {"spatial-convs": keep_spatial_convolutions}


def resolve_keep(keep: str | KeepPolicy | None, where: str) -> KeepPolicy | None:
    """Turn a policy name or callable into a callable; a clear error for anything else."""
    if keep is None or callable(keep):
        return keep
    if isinstance(keep, str) and keep in KEEP_POLICIES:
        return KEEP_POLICIES[keep]
    raise ValueError(f"{where}: keep must be None, a callable policy(func, args, kwargs) -> bool or one of "
                     f"{sorted(KEEP_POLICIES)}, got {keep!r}")


def _signature(func: Any, args: tuple) -> tuple:
    shapes = tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))
    return (func, shapes)


class Record(TorchDispatchMode):
    """Run ops as usual and keep the outputs of those the policy selects, in call order."""

    def __init__(self, policy: KeepPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.kept: list[torch.Tensor] = []
        self.signatures: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and self.policy(func, args, kwargs):
            self.kept.append(out)
            self.signatures.append(_signature(func, args))
        return out


class Replay(TorchDispatchMode):
    """Hand back recorded outputs instead of running the selected ops; run every other op."""

    def __init__(self, policy: KeepPolicy, kept: list[torch.Tensor], signatures: list[tuple], where: str) -> None:
        super().__init__()
        self.policy = policy
        self.kept = kept
        self.signatures = signatures
        self.where = where
        self.used = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
        kwargs = kwargs or {}
        if not self.policy(func, args, kwargs):
            return func(*args, **kwargs)
        if self.used >= len(self.kept) or self.signatures[self.used] != _signature(func, args):
            raise RuntimeError(
                f"ReversibleSegment: {self.where} ran a different sequence of kept ops in the backward "
                f"recomputation than in the forward (at kept op {self.used}: {func}). F and G must compute "
                "the same ops on every call; use keep=None for this coupling."
            )
        out = self.kept[self.used]
        self.used += 1
        # A fresh alias: autograd attaches the recomputed op's backward node to it, not to the kept one.
        return out.detach()

    def check_done(self) -> None:
        if self.used != len(self.kept):
            raise RuntimeError(
                f"ReversibleSegment: {self.where} ran {self.used} kept op(s) in the backward recomputation "
                f"but {len(self.kept)} in the forward; F and G must compute the same ops on every call"
            )
