"""Direct calls of standard layers: F and G without ``nn.Module``'s per-call work.

A reversible segment calls each F and G twice per training step (forward, then recomputation in the
backward), and most are an ``nn.Sequential`` of ``Conv2d``, ``BatchNorm2d`` and ``ReLU`` (timm's
ResNets add ``Identity`` placeholders). Through
``nn.Module.__call__`` each layer costs Python work beside its kernel (hook checks, the norm's
bookkeeping, ``F.batch_norm``'s argument checks): where kernels are short, as on a GPU at moderate
batch sizes, that decides the step time. :class:`DirectSequential` runs the same layers by calling
``torch.conv2d``, ``torch.batch_norm`` and ``torch.relu`` with the same arguments the modules would
pass, read from the modules at each call: the same aten ops with the same values, so outputs,
running statistics and gradients are those of the module call, bit for bit.

It calls the modules instead whenever anything could observe or change the difference:

- for the whole function: a module hook (global, or on the Sequential or any layer), JIT tracing, a
  ``TorchFunctionMode``, an input, parameter or buffer of a tensor subclass that overrides
  ``__torch_function__``, a ``forward`` replaced on an instance, a module compiled with
  ``Module.compile()``;
- per layer: a convolution whose ``padding_mode`` is not ``"zeros"``, a norm with ``momentum=None``,
  without running statistics, with ``eps <= 0`` or on an input that is not 4-D, a training norm
  whose batch has one value per channel (the module raises its own error), a layer whose
  parameters are missing from ``_parameters``.
"""

from __future__ import annotations

import torch
import torch.nn.modules.module as module_state
from torch import nn
from torch.overrides import has_torch_function_unary

__all__ = ["DirectSequential", "direct_call"]

_CONV, _NORM, _RELU, _IDENTITY = 0, 1, 2, 3
_KINDS = {nn.Conv2d: _CONV, nn.BatchNorm2d: _NORM, nn.ReLU: _RELU, nn.Identity: _IDENTITY}


def direct_call(module: nn.Module) -> DirectSequential | None:
    """A :class:`DirectSequential` for ``module`` if it is exactly an ``nn.Sequential`` of
    ``Conv2d`` / ``BatchNorm2d`` / ``ReLU`` / ``Identity`` (no subclasses), else None."""
    if type(module) is not nn.Sequential:
        return None
    layers = tuple(module._modules.values())
    if not layers or any(type(m) not in _KINDS for m in layers):
        return None
    if any(has_torch_function_unary(t) for t in (*module.parameters(), *module.buffers())):
        return None  # tensor subclasses that override torch functions see the module's calls
    return DirectSequential(module, layers)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__ or m.__dict__.get("_compiled_call_impl") is not None)


class DirectSequential:
    """Calls an ``nn.Sequential`` of standard layers like the module would, without its per-layer
    Python work (see the module docstring for when it calls the modules instead).

    Attributes:
        module: the Sequential; ``layers``: its layers, as they were when this was made (the
            segment's plan, which holds it, is remade when a submodule is replaced).
    """

    __slots__ = ("module", "layers", "_kinds", "_all")

    def __init__(self, module: nn.Sequential, layers: tuple[nn.Module, ...]) -> None:
        self.module = module
        self.layers = layers
        self._kinds = tuple(_KINDS[type(m)] for m in layers)
        self._all = (module, *layers)

    def observed(self) -> bool:
        """Whether a hook, tracer or torch-function mode could see the module calls."""
        return bool(module_state._global_forward_hooks or module_state._global_forward_pre_hooks
                    or module_state._global_backward_hooks or module_state._global_backward_pre_hooks
                    or torch._C._get_tracing_state() or torch._C._len_torch_function_stack()
                    or any(_hooked(m) for m in self._all))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed() or has_torch_function_unary(x):
            return self.module(x)
        for m, kind in zip(self.layers, self._kinds):
            if kind == _RELU:
                x = torch.relu_(x) if m.__dict__["inplace"] else torch.relu(x)
            elif kind == _CONV:
                x = _conv(m, x)
            elif kind == _NORM:
                x = _norm(m, x)
        return x


def _conv(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    d, p = m.__dict__, m._parameters
    weight = p.get("weight")
    if d["padding_mode"] != "zeros" or weight is None or "bias" not in p:
        return m(x)
    return torch.conv2d(x, weight, p.get("bias"), d["stride"], d["padding"], d["dilation"], d["groups"])


def _norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # _BatchNorm.forward and F.batch_norm for a norm with running statistics and a momentum.
    d, b, p = m.__dict__, m._buffers, m._parameters
    momentum, eps, training = d["momentum"], d["eps"], d["training"]
    mean, var = b.get("running_mean"), b.get("running_var")
    if momentum is None or eps <= 0 or not d["track_running_stats"] or mean is None or var is None \
            or "weight" not in p or "bias" not in p or x.dim() != 4 or (training and x.shape[0] * x.shape[2] * x.shape[3] == 1):
        return m(x)
    if training:
        counter = b.get("num_batches_tracked")
        if counter is not None:
            counter.add_(1)
    return torch.batch_norm(x, p.get("weight"), p.get("bias"), mean, var, training, momentum, eps,
                            torch.backends.cudnn.enabled)
