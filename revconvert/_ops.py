"""Counting what a training step runs: FLOPs and kernel-launching aten ops, one dispatch mode for both.

FLOPs use ``torch.utils.flop_counter``'s per-op formulas (convolutions, matmuls; norms and
element-wise ops count 0), as ``FlopCounterMode`` does, without its module tracking and
decompositions, which make batch norm on meta tensors a hundred times slower. Kernel-launching ops
are every aten op that reaches the dispatcher below autograd except views and aliases
(``OpOverload.is_view``: view, t, expand, detach, split...) and allocations without a kernel
(``empty*``, ``_unsafe_view``, ``lift_fresh``): on a GPU each is one kernel launch (or one library
call), which is what a step's time follows where kernels are short. The counts are the same on fake
tensors as on real ones, so ``memory_profile`` reports them before training.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["FlopCount", "NO_KERNEL", "launches_kernel"]

_aten = torch.ops.aten

# Ops that dispatch but allocate or alias without running a kernel (views are known by their schema).
NO_KERNEL = frozenset({_aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty,
                       _aten.new_empty_strided, _aten._unsafe_view, _aten.lift_fresh})


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether the op ``func`` runs a kernel: an aten op that is neither a view nor an allocation
    (see the module docstring). Other namespaces launch nothing here (``prim.device``, which a fake
    tensor's ``.device`` dispatches)."""
    return func.namespace == "aten" and not func.is_view and func.overloadpacket not in NO_KERNEL


class FlopCount(TorchDispatchMode):
    """FLOPs (``total``) and kernel-launching ops (``ops``) of the aten ops run under it.

    Entered around forward *and* ``backward()``, it sees the backward's ops too: the autograd engine
    carries dispatch modes into the backward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        if launches_kernel(func):
            self.ops += 1
        return out
