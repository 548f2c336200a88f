"""Optimizer state: how many bytes each optimizer keeps per trainable parameter, and its step's peak.

State is allocated lazily on the first ``step()`` and then stays resident, so a steady training step
(the second and later) carries it through forward and backward:

=============  ================================================  =======================
name           state per trainable parameter tensor              torch class
=============  ================================================  =======================
sgd            nothing                                           ``SGD(momentum=0)``
sgd-momentum   ``momentum_buffer`` (1x the parameter)            ``SGD(momentum=0.9)``
adam, adamw    ``exp_avg``, ``exp_avg_sq`` (2x) + a 0-d ``step``  ``Adam``, ``AdamW``
=============  ================================================  =======================

The step itself needs temporaries besides the state: PyTorch's default implementation for CUDA
tensors is ``foreach`` (Adam holds ``sqrt(exp_avg_sq)`` for all parameters at once: 1x), for CPU
tensors it is the per-tensor loop (Adam holds two temporaries the size of one parameter at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "OptimizerSpec", "optimizer_spec"]


@dataclass(frozen=True)
class OptimizerSpec:
    """What one optimizer choice costs.

    Attributes:
        name: the user-facing name ("adam").
        state_copies: parameter-sized state tensors per trainable parameter.
        scalar_state: 0-d float32 state tensors per trainable parameter (Adam's ``step``).
        foreach_temporaries: parameter-sized temporaries for all parameters at once (foreach step).
        loop_temporaries: parameter-sized temporaries of the largest parameter (per-tensor step).
        factory: builds the real torch optimizer (used by ``measure_memory``).
    """

    name: str
    state_copies: int
    scalar_state: int
    foreach_temporaries: int
    loop_temporaries: int
    factory: Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]

    def state_bytes(self, params: Sequence[torch.Tensor]) -> int:
        """Resident state bytes for ``params`` (only those that require grad count)."""
        trainable = [p for p in params if p.requires_grad]
        scalar = torch.empty((), dtype=torch.get_default_dtype()).element_size()
        return sum(self.state_copies * _nbytes(p) + self.scalar_state * scalar for p in trainable)

    def step_temporary_bytes(self, params: Sequence[torch.Tensor], device: torch.device) -> int:
        """Extra bytes the ``step()`` itself allocates, with PyTorch's default implementation."""
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            return 0
        if device.type == "cuda":  # torch.optim defaults to foreach for CUDA tensors
            return self.foreach_temporaries * sum(_nbytes(p) for p in trainable)
        return self.loop_temporaries * max(_nbytes(p) for p in trainable)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("sgd", 0, 0, 0, 0, lambda ps: torch.optim.SGD(ps, lr=1e-3)),
        OptimizerSpec("sgd-momentum", 1, 0, 0, 0, lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)),
        OptimizerSpec("adam", 2, 1, 1, 2, lambda ps: torch.optim.Adam(ps, lr=1e-3)),
        OptimizerSpec("adamw", 2, 1, 1, 2, lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
    )
}


def optimizer_spec(name: str | None) -> OptimizerSpec | None:
    """Look up an optimizer by name; ``None`` means no optimizer (forward and backward only).

    Raises:
        ValueError: ``name`` is not one of :data:`OPTIMIZERS`.
    """
    if name is None:
        return None
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)} or None "
            "(forward and backward only)"
        )
    return OPTIMIZERS[name.lower()]
