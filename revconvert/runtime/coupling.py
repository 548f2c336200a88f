"""Additive reversible coupling (RevNet, Gomez et al., NeurIPS 2017, arXiv:1707.04585)."""

from __future__ import annotations

import torch
from torch import nn

from ._keep import KeepPolicy, resolve_keep

__all__ = ["ReversibleCoupling"]


class ReversibleCoupling(nn.Module):
    """Additive coupling ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``, exactly invertible by subtraction.

    ``F`` and ``G`` are arbitrary modules mapping a half-width tensor to one of the same shape (e.g.
    conv-BN-ReLU-conv-BN with C/2 outer channels). Used alone, the coupling is an ordinary module whose
    activations autograd stores; inside a :class:`ReversibleSegment` its activations are recomputed in
    the backward pass from the segment's output.

    Without ``G`` it is a *half coupling*, ``y1 = x1 + F(x2)``, ``y2 = x2``: one residual function
    instead of two, as invertible. ``convert(..., ConvertConfig(pair_blocks=True))`` ends a run of an
    odd number of blocks (three or more) with one, so that each block becomes one function.

    Only the additive form is offered. The affine variant ``y2 = x2 * exp(s(y1)) + t(y1)`` needs a
    division in the inverse, whose rounding error is multiplied by ``exp(-s)`` and compounds over a
    long segment; it would not meet the exactness tests of the additive form, so it is left out.

    Args:
        F: residual function applied to ``x2``; must not modify its input in place.
        G: residual function applied to ``y1``; must not modify its input in place. None: a half
            coupling (``y2 = x2``).
        keep: inside a segment, which outputs of F and G to keep from the forward so the backward's
            recomputation skips those ops: None (recompute everything, the least memory),
            ``"spatial-convs"`` (keep the outputs of convolutions larger than 1x1: about half a
            bottleneck's recomputation for about a quarter of its activation bytes), or a callable
            ``policy(func, args, kwargs) -> bool`` on aten ops. Gradients are the same either way.

    Attributes:
        keep: the policy as a callable (or None); may be changed between steps.
        keep_small: also keep calls too small to be worth keeping (below the policy's
            ``min_flops`` for the device, e.g. ``MIN_KEPT_FLOPS``), which are otherwise recomputed
            because handing them back costs more time than running them. A recompute-budget plan sets
            it, so that the planned FLOPs hold at every batch size.

    Example:
        >>> from torch import nn
        >>> block = lambda: nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        >>> coupling = ReversibleCoupling(block(), block())
        >>> x1, x2 = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
        >>> y1, y2 = coupling(x1, x2)
        >>> r1, r2 = coupling.eval().inverse(y1, y2)   # eval: BN uses the same (running) statistics
    """

    def __init__(self, F: nn.Module, G: nn.Module | None = None, *,  # noqa: N803
                 keep: str | KeepPolicy | None = None) -> None:
        super().__init__()
        for name, fn in (("F", F), ("G", G)):
            if not isinstance(fn, nn.Module) and not (name == "G" and fn is None):
                raise TypeError(
                    f"ReversibleCoupling: {name} must be an nn.Module{' or None' if name == 'G' else ''}, "
                    f"got {type(fn).__name__}; wrap a function in a small nn.Module"
                )
        self.F = F
        self.G = G
        self.keep: KeepPolicy | None = resolve_keep(keep, "ReversibleCoupling")
        self.keep_small: bool = False

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("keep_small", False)  # couplings pickled by older versions

    def extra_repr(self) -> str:
        return "" if self.keep is None else f"keep={getattr(self.keep, '__name__', self.keep)}"

    @property
    def functions(self) -> tuple[nn.Module, ...]:
        """``(F, G)``, or ``(F,)`` for a half coupling."""
        return (self.F,) if self.G is None else (self.F, self.G)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y1, y2) = (x1 + F(x2), x2 + G(y1))`` (``y2 = x2`` without G)."""
        y1 = x1 + self.F(x2)
        y2 = x2 if self.G is None else x2 + self.G(y1)
        return y1, y2

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x1, x2) = (y1 - F(x2), y2 - G(y1))``, the input that produced ``(y1, y2)``.

        The result equals the true input up to floating-point rounding, provided F and G compute the
        same functions as in the forward (same RNG draws, same normalisation statistics).
        """
        x2 = y2 if self.G is None else y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return x1, x2
