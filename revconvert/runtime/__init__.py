"""Reversible runtime: additive couplings and segments with RevNet's memory-saving backward.

Example:
    >>> from revconvert import ReversibleCoupling, ReversibleSegment, ordinary_autograd
"""

from __future__ import annotations

from ._keep import KEEP_POLICIES, keep_spatial_convolutions
from .coupling import ReversibleCoupling
from .segment import ReversibleSegment, ordinary_autograd

__all__ = ["KEEP_POLICIES", "ReversibleCoupling", "ReversibleSegment", "keep_spatial_convolutions",
           "ordinary_autograd"]
