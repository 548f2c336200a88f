"""``measure_memory``: the memory of one real training step, in the same report as the estimate.

The step runs on a deep copy of the model (train mode, gradients ``None``), so the caller's
weights, batch-norm running statistics, gradients and train/eval mode are unchanged; the copy's
parameters cost one extra copy of the weights while it runs. Saved-for-backward bytes come from
``saved_tensors_hooks``, the peak from an allocation tracker that works on any device (CPU
included), and on CUDA ``torch.cuda.max_memory_allocated`` is reported too.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .optim import optimizer_spec
from .report import MemoryBreakdown
from .segments import segmentation
from .step import StepResources, run_step
from .tracker import storage_bytes

__all__ = ["measure_memory"]


def measure_memory(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    optimizer: str | None = None,
    **trace_options: Any,
) -> MemoryBreakdown:
    """Measure one training step of ``model`` on ``example_input``: forward, backward, optimizer step.

    The step is a steady-state step in train mode, like :func:`memory_profile`'s: gradients start as
    ``None``; with an ``optimizer`` its state is created beforehand (one step on zero gradients) and
    the measured step includes ``optimizer.step()``. The loss is the sum of the outputs.

    Args:
        model: the model (original or converted). It is not modified: a deep copy runs the step.
        example_input: the batch, a tensor or a tuple of tensors, on the model's device.
        optimizer: None, "sgd", "sgd-momentum", "adam" or "adamw".
        **trace_options: passed to the audit's tracer (``leaf_modules=...``).

    Returns:
        A :class:`MemoryBreakdown` with ``source="measurement"``; ``cuda_peak_bytes`` is set when the
        model runs on CUDA.

    Raises:
        ValueError: unknown ``optimizer``.

    Example:
        >>> model = torchvision.models.resnet18()
        >>> measured = revconvert.measure_memory(model, torch.randn(8, 3, 128, 128))
        >>> estimated = revconvert.memory_profile(model, (3, 128, 128), 8, converted=False).original
        >>> measured.activation_bytes / estimated.activation_bytes
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_input must be a tensor or a tuple of tensors, got "
                        f"{type(example_input).__name__}")
    spec = optimizer_spec(optimizer)

    work = copy.deepcopy(model)
    work.train()
    seg = segmentation(work, inputs[0] if len(inputs) == 1 else inputs, **trace_options)
    gm = seg.graph_module
    gm.train()
    params = list({id(p): p for p in gm.parameters()}.values())
    buffers = list(gm.buffers())
    for p in params:
        p.grad = None

    state: list[torch.Tensor] = []
    step: Callable[[], None] | None = None
    if spec is not None:
        opt = spec.factory([p for p in params if p.requires_grad])
        _create_state(opt)
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        step = opt.step

    on_cuda = any(t.is_cuda for t in [*params, *inputs])
    if on_cuda:
        gc.collect()  # garbage freed during the step would make max_memory_allocated - base too small
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    res = StepResources(params=params, buffers=buffers, optimizer_state=state, inputs=inputs,
                        optimizer_step=step, optimizer_name=optimizer)
    with torch.enable_grad():
        breakdown = run_step(seg, res)
    cuda_peak = None
    if on_cuda:
        torch.cuda.synchronize()
        resident = storage_bytes([*params, *buffers, *state, *tree_leaves(inputs)])
        cuda_peak = torch.cuda.max_memory_allocated() - base + resident
    del work, seg, gm, params, buffers, state, step, res
    gc.collect()  # fx graphs are cyclic: free the copy now, not at some later collection
    return dataclasses.replace(breakdown, cuda_peak_bytes=cuda_peak, source="measurement")


def _create_state(opt: torch.optim.Optimizer) -> None:
    """Run one step on zero gradients so the state a steady training step carries exists."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None

