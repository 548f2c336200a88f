"""The loss a memory or FLOP measurement back-propagates: every output that requires grad, summed."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["training_loss"]


def training_loss(output: Any) -> torch.Tensor:
    """The sum of every output that requires grad: a loss whose backward reaches all of them."""
    tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not tensors:
        raise ValueError(
            "the model's output does not require grad, so there is no backward pass to measure; "
            "check that some parameters have requires_grad=True"
        )
    loss = tensors[0].sum()
    for t in tensors[1:]:
        loss = loss + t.sum()
    return loss
