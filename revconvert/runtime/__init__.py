"""Reversible runtime: additive couplings and segments with RevNet's memory-saving backward.

Example:
    >>> from revconvert import ReversibleCoupling, ReversibleSegment, ordinary_autograd
"""

from __future__ import annotations

from .coupling import ReversibleCoupling
from .segment import ReversibleSegment, ordinary_autograd

__all__ = ["ReversibleCoupling", "ReversibleSegment", "ordinary_autograd"]
