"""``memory_profile``: training memory of a model and of its conversion, before training, on fake tensors.

The model is deep-copied onto the meta device (no data), converted if asked, traced, and its
parameters and buffers become ``FakeTensor``s (shape, dtype and device, no data); and one training step runs on a fake input batch under the same instruments
that ``measure_memory`` uses on real tensors. A batch of 1024 224x224 images costs seconds and no
activation memory. The caller's model is never touched: not its parameters, buffers (batch-norm
running statistics), train/eval mode or hooks, and none of its hooks (nor a global module hook) runs:
the estimate is of the model without them.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..analysis.hooks import no_global_hooks
from ..analysis.tracing import meta_copy, model_name, unwrap_compiled
from ..passes.convert import ConvertConfig, convert
from ..runtime import ReversibleSegment
from .optim import optimizer_spec
from .report import MemoryBreakdown, MemoryProfile
from .segments import segmentation
from .step import StepResources, StepTimeline, run_step

__all__ = ["memory_profile", "DTYPES", "TRACE_OPTIONS"]

TRACE_OPTIONS = ("leaf_modules", "autowrap_functions", "concrete_args")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def memory_profile(
    model: nn.Module,
    input_size: Sequence[int] | int = (3, 224, 224),
    batch_size: int = 1,
    *,
    dtype: torch.dtype | str = torch.float32,
    optimizer: str | None = None,
    converted: bool = True,
    device: torch.device | str | None = None,
    config: ConvertConfig | None = None,
    **trace_options: Any,
) -> MemoryProfile:
    """Estimate the memory of one training step, for the model and for its reversible conversion.

    Runs on fake tensors: nothing the size of an activation is allocated, so large batches are cheap.
    The step is a steady-state one in train mode (gradients start as ``None``, optimizer state
    exists): forward, backward and, with ``optimizer``, the optimizer's step.

    Args:
        model: the model; it is neither modified nor run (a fake copy is).
        input_size: one sample's shape, ``(C, H, W)`` (or ``(C, L)``, ``(C, D, H, W)`` for Conv1d or
            Conv3d models), or an int ``S`` for ``(3, S, S)``.
        batch_size: samples per batch (positive).
        dtype: parameter and input dtype: a ``torch.dtype`` or one of :data:`DTYPES`' names.
        optimizer: None, "sgd", "sgd-momentum", "adam" or "adamw"; adds its state and step.
        converted: also estimate ``revconvert.convert(model)`` (side by side in the report).
        device: device to estimate for ("cpu", "cuda"); default the device of the model's parameters.
            It decides, for example, which optimizer implementation PyTorch picks.
        config: the :class:`revconvert.ConvertConfig` of the conversion to estimate (default: the
            default conversion), e.g. ``ConvertConfig(checkpoint_stored=True)``. Its tracing options
            are used for both models; do not pass them as keywords too.
        **trace_options: tracing options for the audit and the conversion (``leaf_modules=...``,
            ``autowrap_functions=...``, ``concrete_args=...``).

    Returns:
        A :class:`MemoryProfile`; ``str()`` of it is the table, ``to_dict()`` is JSON-ready.

    Raises:
        ValueError: bad ``input_size``, ``batch_size``, ``dtype`` or ``optimizer`` (the message
            lists the valid choices), or tracing options both in ``config`` and as keywords.
        TypeError: ``config`` is not a ``ConvertConfig``.
        TraceError: the model cannot be traced.

    Example:
        >>> import torchvision, revconvert
        >>> profile = revconvert.memory_profile(torchvision.models.resnet18(), batch_size=256,
        ...                                     optimizer="adam")
        >>> print(profile)                       # per-segment table, original vs converted
        >>> profile.converted.peak_bytes / profile.original.peak_bytes
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_compiled(model)  # torch.compile(model): estimate the module it wraps (run eagerly)
    shape = _check_input_size(input_size, model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dtype = _check_dtype(dtype)
    optimizer_spec(optimizer)  # validate before any work
    if not isinstance(converted, bool):
        raise TypeError(f"converted must be True or False, got {converted!r}")
    device = _check_device(model, device)
    unknown = sorted(set(trace_options) - set(TRACE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; memory_profile passes only "
                         f"tracing options on: {', '.join(TRACE_OPTIONS)}")
    config = _check_config(config, trace_options)
    trace_options = {name: getattr(config, name) for name in TRACE_OPTIONS}

    with no_global_hooks():  # the step runs on fake tensors: no hook of the caller's may see them
        original = _estimate(model, shape, batch_size, dtype, optimizer, device, None, trace_options)
        gc.collect()  # fx graphs are cyclic: release the first copy before making the second
        conv = None
        # A model that is already converted is profiled as it is: there is nothing to compare it with.
        already = any(isinstance(m, ReversibleSegment) for m in model.modules())
        if converted and not already:
            conv = _estimate(model, shape, batch_size, dtype, optimizer, device, config, trace_options)
            gc.collect()
    return MemoryProfile(original=original, converted=conv, batch_size=batch_size, input_size=shape,
                         dtype=str(dtype).removeprefix("torch."), device=device.type,
                         model_name=model_name(model))


def _check_config(config: ConvertConfig | None, trace_options: dict[str, Any]) -> ConvertConfig:
    if config is None:
        return ConvertConfig(**trace_options)
    if not isinstance(config, ConvertConfig):
        raise TypeError(f"config must be a revconvert.ConvertConfig, got {type(config).__name__}")
    if trace_options:
        raise ValueError(f"tracing option(s) {', '.join(map(repr, sorted(trace_options)))} given both as "
                         f"keywords and in config; set them in the ConvertConfig only")
    return config


def _check_input_size(input_size: Sequence[int] | int, model: nn.Module) -> tuple[int, ...]:
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (3, input_size, input_size)
    try:
        shape = tuple(input_size)
    except TypeError:
        shape = ()
    # One sample of a model whose first convolution is k-dimensional is (C, *k sizes): (C, H, W) for
    # images, (C, L) for Conv1d models, (C, D, H, W) for Conv3d ones. Without a convolution, any rank.
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    rank = len(conv.kernel_size) + 1 if conv is not None else None
    form = {2: "(C, L)", 3: "(C, H, W)", 4: "(C, D, H, W)"}.get(rank or 0, "(C, H, W)")
    if (not shape or (rank is not None and len(shape) != rank)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ValueError(
            f"input_size must be one sample's shape {form} with positive ints"
            + (f" ({type(model).__name__}'s first convolution is {type(conv).__name__})" if conv else "")
            + f", e.g. (3, 224, 224) for an image model, or an int S meaning (3, S, S); got {input_size!r}")
    return shape


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")


def _check_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is None:
        first = next(iter(model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'") from e
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        # Fake tensors allocate nothing, but autograd's engine still sets up the device for a
        # backward on CUDA tensors, and fails deep inside with "hasPrimaryContext expects a valid
        # device index".
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"device {str(device)!r}: this machine has {have}, and estimating a CUDA step needs "
                         f"one (PyTorch's autograd sets the device up even for fake tensors). Estimate with "
                         f"device='cpu' here: the same tensors, without cuDNN's workspaces (about 1% of a "
                         f"CUDA peak, see the README), or run the estimate on the GPU machine")
    return device


def _estimate(model: nn.Module, shape: tuple[int, ...], batch_size: int, dtype: torch.dtype,
              optimizer: str | None, device: torch.device, config: ConvertConfig | None,
              trace_options: dict[str, Any], timeline: StepTimeline | None = None) -> MemoryBreakdown:
    """One breakdown: of ``model`` as it is (``config`` None), or of its conversion by ``config``.
    ``timeline`` is filled in by the step (see :class:`StepTimeline`)."""
    work = _meta_copy(model)
    example = (batch_size, *shape)  # a shape: the audit traces on meta tensors, nothing is allocated
    if config is not None:
        work = convert(work, example, config=config)
        work.train()
    seg = segmentation(work, example, **trace_options)
    seg.graph_module.train()

    mode = FakeTensorMode()
    params, buffers = _fakeify(seg.graph_module, mode, dtype, device)
    spec = optimizer_spec(optimizer)
    with mode:
        inputs = (torch.empty(batch_size, *shape, dtype=dtype, device=device),)
        state: list[torch.Tensor] = []
        if spec is not None:
            for p in (p for p in params if p.requires_grad):
                state += [torch.empty_like(p) for _ in range(spec.state_copies)]
                state += [torch.empty((), dtype=torch.get_default_dtype()) for _ in range(spec.scalar_state)]
        resources = StepResources(
            params=params, buffers=buffers, optimizer_state=state, inputs=inputs,
            modeled_step_bytes=spec.step_temporary_bytes(params, device) if spec else 0,
            optimizer_name=optimizer)
        try:
            return run_step(seg, resources, timeline=timeline)
        except ValueError as e:
            if "more than 1 value per channel" not in str(e):
                raise
            raise ValueError(
                f"memory_profile: batch_size={batch_size} at input size {shape} leaves a BatchNorm layer "
                f"one value per channel in training mode (the last stage is 1x1 there); use "
                f"batch_size >= 2 or a larger input_size") from e


def _meta_copy(model: nn.Module) -> nn.Module:
    """A meta-tensor deep copy (see :func:`revconvert.tracing.meta_copy`), in train mode."""
    work = meta_copy(model)
    work.train()
    return work


def _fakeify(root: nn.Module, mode: FakeTensorMode, dtype: torch.dtype,
             device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Replace every parameter and buffer under ``root`` by a fake tensor on ``device`` (in place).

    Floating-point tensors take ``dtype`` (as ``module.to(dtype)`` would); shapes and strides are
    kept. Tensors shared between modules stay shared.
    """
    memo: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor, is_param: bool) -> torch.Tensor:
        if id(t) not in memo:
            with mode:
                f = torch.empty_strided(t.shape, t.stride(), device=device,
                                        dtype=dtype if t.is_floating_point() else t.dtype)
            memo[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if is_param else f
        return memo[id(t)]

    params: dict[int, torch.Tensor] = {}
    buffers: dict[int, torch.Tensor] = {}
    for module in root.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = fake(p, True)
                params[id(module._parameters[name])] = module._parameters[name]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fake(b, False)
                buffers[id(module._buffers[name])] = module._buffers[name]
    return list(params.values()), list(buffers.values())
